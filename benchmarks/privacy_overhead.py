"""What privacy costs per round: plain vs signed+encrypted vs SecAgg+ vs differential privacy.

Runs the same short federation (default: ``simulations/hospitals-3.toml`` cut to 2 rounds of
5 local steps, 32 held-out records and 16 questions per task per site) once per variant, with
``fed-llama simulate`` (Flower's Simulation Engine, the product's code path), and reads each
run's history: round wall time, the training phase (sites train, sign/encrypt, the aggregator
verifies/decrypts/aggregates), bytes up per site, and held-out perplexity after the last
round. Ratios are to ``plain`` measured in the same run of this script.

- ``plain``: ``security.envelopes = false`` (Flower's messages only);
- ``envelopes``: every update HPKE-encrypted to the aggregator and Ed25519-signed, every
  round's global adapter signed and hash-chained (the default);
- ``envelopes+dp``: also client-level DP (noise multiplier 1.0, the default clip norm), with
  its epsilon;
- ``secagg+``: Flower's SecAgg+ (the aggregator unmasks only the weighted sum; no envelopes:
  the masks protect the updates); its bytes are each site's masked update;
- ``envelopes+dp z=...``: more noise multipliers, for the utility-vs-epsilon table (pooled
  held-out perplexity and its ratio to the run without DP, against the epsilon reached).

Beside perplexity, every run answers 16 held-out questions per task per site after each round
(the scenario's ``[evaluation]``): pooled description -> code accuracy at the category and the
chapter level, and code -> description token F1. With 5 local steps per site per round the
adapters have barely learned the answer format (even 60 steps give a category accuracy under
0.1 in ``federated_vs_local.py``), so the coarser chapter and F1 scores are the ones that
move. The answers are generated in every variant alike, so they add the same time to each
round; ``train_phase_x_plain`` is the ratio that isolates what privacy costs.

    python benchmarks/privacy_overhead.py             # about 30 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from harness import add_json_argument, add_scenario_arguments, write_results
from variant_runs import print_table, run_variants

SHORT = ["federation.rounds=2", "train.max_steps=5", "data.max_heldout_records=32",
         "evaluation.questions=16"]
VARIANTS: dict[str, list[str]] = {
    "plain": ["security.envelopes=false", "security.seal_rounds=false"],
    "envelopes": [],
    "envelopes+dp": ["privacy.noise_multiplier=1.0"],
    "secagg+": ["security.envelopes=false", "security.seal_rounds=false",
                "secure_aggregation.enabled=true"],
}
NOISE_SWEEP = (0.5, 2.0, 4.0)
"""Further noise multipliers for the utility-vs-epsilon table (0 and 1.0 are above)."""


def plot_utility(utility: dict[str, dict[str, Any]], out: Path) -> None:
    """Pooled held-out perplexity against epsilon (the no-DP run as a horizontal line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dp = [(r["dp_epsilon"], r["pooled_ppl"], name) for name, r in utility.items()
          if "dp_epsilon" in r]
    ax.plot([e for e, _, _ in dp], [p for _, p, _ in dp], marker="o", label="client-level DP")
    for eps, ppl, name in dp:
        ax.annotate(name, (eps, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, r in utility.items():
        if "dp_epsilon" not in r:
            ax.axhline(r["pooled_ppl"], color="gray", linestyle="--", label=f"{name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("epsilon after the last round (at privacy.delta)")
    ax.set_ylabel("pooled held-out perplexity")
    ax.set_title("Utility vs privacy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"plot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scenario_arguments(parser, "extra scenario overrides for every variant")
    add_json_argument(parser, "privacy_overhead.json")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the utility-vs-epsilon runs (noise multipliers "
                        f"{', '.join(map(str, NOISE_SWEEP))})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    overrides = SHORT + args.overrides
    variants = dict(VARIANTS)
    if not args.no_sweep:
        variants.update({f"envelopes+dp z={z}": [f"privacy.noise_multiplier={z}"]
                         for z in NOISE_SWEEP})
    results = run_variants(Path(args.scenario), variants, overrides)
    plain = results["plain"]
    for r in results.values():
        r["round_x_plain"] = round(r["round_s"] / plain["round_s"], 3)
        r["train_phase_x_plain"] = round(r["train_phase_s"] / plain["train_phase_s"], 3)
        r["bytes_x_plain"] = round(r["bytes_up_per_site"] / plain["bytes_up_per_site"], 4)
    print("What privacy costs per round (ratios to plain, this run):")
    print_table({k: v for k, v in results.items() if k in VARIANTS},
                ["round_s", "round_x_plain", "train_phase_s", "train_phase_x_plain",
                 "bytes_up_per_site", "bytes_x_plain", "pooled_ppl", "pooled_category",
                 "pooled_chapter", "pooled_desc_f1", "dp_epsilon", "refused"])
    utility = {"no DP (z=0)": results["envelopes"]}
    for name, r in results.items():
        if name.startswith("envelopes+dp"):
            z = 1.0 if name == "envelopes+dp" else float(name.split("=")[1])
            utility[f"z={z}"] = r
    utility = dict(sorted(utility.items(), key=lambda kv: kv[1].get("dp_epsilon", 1e9),
                          reverse=True))
    base = results["envelopes"]["pooled_ppl"]
    for r in utility.values():
        r["ppl_x_no_dp"] = round(r["pooled_ppl"] / base, 3)
    print(f"Utility vs epsilon (delta and clip norm as configured; {SHORT[0]}, "
          f"{SHORT[1]}):")
    print_table(utility, ["dp_epsilon", "pooled_ppl", "ppl_x_no_dp", "pooled_chapter",
                          "pooled_desc_f1"])
    plot_utility(utility, Path(args.json).with_name("privacy_utility.png"))
    write_results(args.json, {"scenario": args.scenario, "overrides": overrides,
                              "variants": results})
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
