"""What privacy costs per round: plain vs signed+encrypted vs differential privacy.

Runs the same short federation (default: ``simulations/hospitals-3.toml`` cut to 2 rounds of
5 local steps, 32 held-out records per site, no task questions) once per variant, with
``fed-llama simulate`` (Flower's Simulation Engine, the product's code path), and reads each
run's history: round wall time, the training phase (sites train, sign/encrypt, the aggregator
verifies/decrypts/aggregates), bytes up per site, and held-out perplexity after the last
round. Ratios are to ``plain`` measured in the same run of this script.

- ``plain``: ``security.envelopes = false`` (Flower's messages only);
- ``envelopes``: every update HPKE-encrypted to the aggregator and Ed25519-signed, every
  round's global adapter signed and hash-chained (the default);
- ``envelopes+dp``: also client-level DP (noise multiplier 1.0, the default clip norm), with
  its epsilon.

Secure aggregation (SecAgg+) is not built, so it has no row.

    python benchmarks/privacy_overhead.py             # about 10 minutes on 2 cores
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHORT = ["federation.rounds=2", "train.max_steps=5", "data.max_heldout_records=32",
         "evaluation.questions=0"]
VARIANTS: dict[str, list[str]] = {
    "plain": ["security.envelopes=false", "security.seal_rounds=false"],
    "envelopes": [],
    "envelopes+dp": ["privacy.noise_multiplier=1.0"],
}


def summarize(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    sites = [k[:-len("/bytes-up")] for k in rows[0] if k.endswith("/bytes-up")]
    out = {"rounds": len(rows), "wall_s": round(seconds, 1),
           "round_s": round(statistics.mean(r["round-seconds"] for r in rows), 2),
           "train_phase_s": round(statistics.mean(r["train-phase-seconds"] for r in rows), 2),
           "bytes_up_per_site": round(statistics.mean(
               r[f"{s}/bytes-up"] for r in rows for s in sites)),
           "pooled_ppl": round(rows[-1]["pooled-perplexity"], 2),
           "refused": int(sum(r.get("sites-refused", 0) for r in rows))}
    if "dp-epsilon" in rows[-1]:
        out["dp_epsilon"] = round(rows[-1]["dp-epsilon"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(ROOT / "simulations" / "hospitals-3.toml"))
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="extra scenario overrides for every variant")
    parser.add_argument("--json", default=str(HERE / "results" / "privacy_overhead.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from fed_llama.common.files import write_text_atomic
    from fed_llama.simulation.runner import simulate

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fed-llama-privacy-") as tmp:
        for name, extra in VARIANTS.items():
            started = time.monotonic()
            store = simulate(Path(args.scenario), Path(tmp) / name,
                             overrides=SHORT + args.overrides + extra)
            results[name] = summarize(store.history(), time.monotonic() - started)
            print(f"  {name}: done", flush=True)
    plain = results["plain"]
    for r in results.values():
        r["round_x_plain"] = round(r["round_s"] / plain["round_s"], 3)
        r["train_phase_x_plain"] = round(r["train_phase_s"] / plain["train_phase_s"], 3)
        r["bytes_x_plain"] = round(r["bytes_up_per_site"] / plain["bytes_up_per_site"], 4)
    cols = ["round_s", "round_x_plain", "train_phase_s", "train_phase_x_plain",
            "bytes_up_per_site", "bytes_x_plain", "pooled_ppl", "dp_epsilon", "refused"]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    print("| secagg+ | not built |")
    write_text_atomic(Path(args.json), json.dumps(
        {"scenario": args.scenario, "overrides": SHORT + args.overrides, "variants": results},
        indent=2))
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
