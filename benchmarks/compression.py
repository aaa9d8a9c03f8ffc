"""What compressed updates save and cost: bytes per site per round and pooled perplexity.

Runs the main job's federation (``simulations/hospitals-3.toml``: 3 hospitals, 30 rounds of 2
local steps, signed and encrypted updates) once per ``federation.update_compression`` with
``fed-llama simulate`` (the product's code path) and reads each run's history: bytes each
site sent per round (the envelope) and pooled held-out perplexity after every evaluated round.
Ratios are to ``none`` measured in the same run of this script. The task questions are skipped
(``evaluation.questions = 0``): perplexity is the figure compared, and generation would double
the run. One run per variant (the runs are seeded alike; the difference between variants is
the rounding of the updates).

Resumable: each finished variant is written to the JSON at once and skipped on the next run
(``--force`` runs everything again).

    python benchmarks/compression.py            # about 35 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import add_json_argument, add_scenario_arguments, markdown_table, write_results

VARIANTS = ("none", "int8", "int4")
FAST = ["evaluation.questions=0"]


def summarize(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Bytes per site per round, pooled perplexity after each evaluated round, refusals,
    wall time."""
    sites = [k[:-len("/bytes-up")] for k in rows[0] if k.endswith("/bytes-up")]
    return {"rounds": len(rows), "wall_s": round(seconds, 1),
            "bytes_up_per_site": round(statistics.mean(
                r[f"{s}/bytes-up"] for r in rows for s in sites if f"{s}/bytes-up" in r)),
            "adapter_bytes": round(rows[0]["bytes-down"] / max(rows[0]["sites-sent"], 1)),
            "evaluated_rounds": [int(r["round"]) for r in rows if "pooled-perplexity" in r],
            "pooled_ppl_by_round": [round(r["pooled-perplexity"], 3) for r in rows
                                    if "pooled-perplexity" in r],
            "refused": int(sum(r.get("sites-refused", 0) for r in rows))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scenario_arguments(parser, "extra scenario overrides for every variant")
    add_json_argument(parser, "compression.json")
    parser.add_argument("--force", action="store_true", help="run every variant again")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the variants to run, in this order (default: all; `none`, the "
                             "baseline of the ratios, is measured first whatever the order)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fed_llama.launch.simulate import simulate

    path = Path(args.json)
    overrides = FAST + args.overrides
    done: dict[str, Any] = {}
    if path.is_file() and not args.force:
        saved = json.loads(path.read_text())
        if saved.get("overrides") == overrides:
            done = saved.get("variants", {})
    with tempfile.TemporaryDirectory(prefix="fed-llama-compression-") as tmp:
        for name in dict.fromkeys(["none", *args.variants]):
            if name in done:
                print(f"  {name}: already measured (--force to run again)")
                continue
            started = time.monotonic()
            variant = [*overrides, f"federation.update_compression='{name}'"]
            store = simulate(Path(args.scenario), Path(tmp) / name, overrides=variant)
            done[name] = summarize(store.history(), time.monotonic() - started)
            print(f"  {name}: {done[name]}", flush=True)
            write_results(path, {"scenario": args.scenario, "overrides": overrides,
                                 "variants": done})
    base = done["none"]
    done = {k: done[k] for k in VARIANTS if k in done}
    for r in done.values():
        r["bytes_x_none"] = round(r["bytes_up_per_site"] / base["bytes_up_per_site"], 4)
        r["ppl_x_none_by_round"] = [round(p / q, 4) for p, q in
                                    zip(r["pooled_ppl_by_round"], base["pooled_ppl_by_round"],
                                        strict=True)]
        r["worst_ppl_cost"] = round(max(r["ppl_x_none_by_round"]) - 1, 4)
    print("Compressed updates (ratios to none, this run):")
    print(markdown_table([{"variant": k, **v} for k, v in done.items()],
                         ["variant", "bytes_up_per_site", "bytes_x_none",
                          "pooled_ppl_by_round", "ppl_x_none_by_round", "worst_ppl_cost",
                          "refused", "wall_s"]))
    write_results(path, {"scenario": args.scenario, "overrides": overrides, "variants": done})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
