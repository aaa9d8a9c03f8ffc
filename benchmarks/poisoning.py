"""One poisoning site against the aggregator's defences: held-out perplexity vs a clean run.

Four ICD-10 hospitals (cardiology, oncology, psychiatry, neurology) on the default backbone,
2 rounds of 5 local steps, 32 held-out records per site; one site (neurology) sends, every
round, the global adapter plus 100 times its honest change (``[attack] poison_sites``; the
update is still signed and encrypted, as a compromised site's would be). Every variant runs
with ``fed-llama simulate`` (Flower's Simulation Engine, the product's code path):

- ``clean``: no attack, FedAvg on factors (the reference);
- ``poisoned, no defence``: FedAvg, the norm-outlier refusal switched off;
- ``poisoned+median``: coordinate-wise median, no refusal;
- ``poisoned+refusal``: FedAvg with the default check that refuses an update changing the
  adapter by more than ``norm_outlier_factor`` (10) times the round's median change.

It prints pooled held-out perplexity and its ratio to ``clean`` (target of the privacy issue:
within 5% with a defence on) and, beside it, the pooled task scores of 16 held-out questions
per task per site (description -> code category and chapter accuracy, code -> description
token F1), and writes JSON.

    python benchmarks/poisoning.py                # about 21 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from harness import add_json_argument, add_scenario_arguments, write_results
from variant_runs import print_table, run_variants

SETUP = ["federation.sites=['icd10:cardiology', 'icd10:oncology', 'icd10:psychiatry', "
         "'icd10:neurology']", "federation.rounds=2", "train.max_steps=5",
         "data.max_heldout_records=32", "evaluation.questions=16"]
POISON = ["attack.poison_sites=['neurology']", "attack.poison_scale=100.0"]
NO_REFUSAL = ["security.norm_outlier_factor=0"]
MEDIAN = ["federation.robust='median'"]
VARIANTS: dict[str, list[str]] = {
    "clean": [],
    "poisoned, no defence": POISON + NO_REFUSAL,
    "poisoned+median": POISON + NO_REFUSAL + MEDIAN,
    "poisoned+refusal": POISON,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scenario_arguments(parser, "extra scenario overrides for every variant")
    add_json_argument(parser, "poisoning.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    overrides = SETUP + args.overrides
    results = run_variants(Path(args.scenario), VARIANTS, overrides)
    clean = results["clean"]["pooled_ppl"]
    for r in results.values():
        r["ppl_x_clean"] = round(r["pooled_ppl"] / clean, 3)
        r["within_5pct"] = r["pooled_ppl"] <= 1.05 * clean
    print("4 sites, 2 rounds x 5 local steps; neurology poisons (change x 100) every round:")
    print_table(results, ["pooled_ppl", "ppl_x_clean", "within_5pct", "pooled_category",
                          "pooled_chapter", "pooled_desc_f1", "refused", "round_s"])
    write_results(args.json, {"scenario": args.scenario, "overrides": overrides,
                              "poison": POISON, "variants": results})
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
