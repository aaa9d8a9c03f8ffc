"""Run one scenario several ways with ``fed-llama simulate`` and summarize each run's history.

Shared by the benchmarks that compare settings of the same short federation (privacy costs,
poisoning defences): every variant goes through Flower's Simulation Engine, the product's own
code path, and is read back from the ``history.json`` it wrote.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import markdown_table


def summarize(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """A run's round time, training-phase time, bytes up per site, last-round perplexity and
    task scores, refusals and DP epsilon."""
    sites = [k[:-len("/bytes-up")] for k in rows[0] if k.endswith("/bytes-up")]
    last = rows[-1]
    out = {"rounds": len(rows), "wall_s": round(seconds, 1),
           "round_s": round(statistics.mean(r["round-seconds"] for r in rows), 2),
           "train_phase_s": round(statistics.mean(r["train-phase-seconds"] for r in rows), 2),
           "bytes_up_per_site": round(statistics.mean(
               r[f"{s}/bytes-up"] for r in rows for s in sites if f"{s}/bytes-up" in r)),
           "pooled_ppl": round(last["pooled-perplexity"], 2),
           "refused": int(sum(r.get("sites-refused", 0) for r in rows))}
    for key, name in (("pooled/desc2code/category", "pooled_category"),
                      ("pooled/desc2code/chapter", "pooled_chapter"),
                      ("pooled/code2desc/f1", "pooled_desc_f1")):
        if key in last:
            out[name] = round(last[key], 3)
    if "dp-epsilon" in last:
        out["dp_epsilon"] = round(last["dp-epsilon"], 3)
    return out


def run_variants(scenario: Path, variants: dict[str, list[str]], overrides: list[str]
                 ) -> dict[str, dict[str, Any]]:
    """Each variant's summary: ``scenario`` with ``overrides`` and then the variant's own."""
    from fed_llama.launch.simulate import simulate

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fed-llama-variants-") as tmp:
        for name, extra in variants.items():
            started = time.monotonic()
            store = simulate(scenario, Path(tmp) / name.replace("/", "-"),
                             overrides=overrides + extra)
            results[name] = summarize(store.history(), time.monotonic() - started)
            print(f"  {name}: {results[name]}", flush=True)
    return results


def print_table(results: dict[str, dict[str, Any]], cols: list[str]) -> None:
    """A markdown table of the variants, one column per key in ``cols``."""
    print(markdown_table([{"variant": name, **r} for name, r in results.items()],
                         ["variant", *cols]))
