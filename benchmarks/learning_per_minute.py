"""What the main job learns of its task in its time budget, setting by setting.

The main job (``simulations/hospitals-3.toml``: three hospitals, at first three rounds of FedAvg
of 20 local steps; the variants are overrides of that scenario as it was then, so the script
pins it with :data:`BASE`) must
end with pooled description -> code category accuracy of at least 10% on its held-out sample,
in the same wall time. This script runs the scenario through ``fed-llama simulate`` (Flower's
Simulation Engine, the product's own path) once per variant (learning rate, how the loss
averages answer tokens, how the ICD-10 answers are written, how updates are weighted), each a
few overrides of the scenario, and measures each run's last global adapter two ways:

- the main job's own figure: the pooled category share on the run's evaluation sample
  (``evaluation.questions`` per site, as the main job prints it);
- the same share on every held-out description -> code question of every site (about 490),
  with its standard error, so variants can be ranked beyond the sample's noise.

It prints one table (the first variant, the main job as shipped, is the baseline each ratio is
against) and writes JSON after every variant; run the same command again and it goes on with the
variants not yet measured (``--fresh`` starts over).

    python benchmarks/learning_per_minute.py
    python benchmarks/learning_per_minute.py --only baseline lr-0.01
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

from category_gap import pooled_se
from harness import RESULTS, add_scenario_arguments, markdown_table, write_results

BASE = ["federation.rounds=3", "train.max_steps=20", "train.warmup_steps=2",
        "federation.local_optimizer='restart'", "lora.include_mlp=false",
        "evaluation.questions=16", "evaluation.tasks=[]", "train.lr=0.003",
        "train.batch_size=8", "data.system_prompt='template'", "data.max_heldout_records=128"]
"""The main job's scenario as the variants were measured against (before it took 30 rounds of
2 steps with kept moments, the ``30x2+keep`` variant, then MLP adapters, then the last
variant's learning rate, system message and batch, and its own evaluation sample): put before
every variant's overrides, so every row is scored on the same sample (16 questions per kind
per site of 128 held-out records)."""
CYCLIC = ["federation.participation='cyclic'", "federation.local_optimizer='keep'",
          "federation.rounds=9"]
SHORT = ["federation.rounds=30", "train.max_steps=2", "train.warmup_steps=1",
         "federation.local_optimizer='keep'"]
"""The ``30x2+keep`` variant's shape, which the main job took."""
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "lr-0.01": ["train.lr=0.01"],
    "lr-0.01+examples": ["train.lr=0.01", "train.loss_average='examples'"],
    "chapter-code": ["data.icd10_answers='chapter-code'"],
    "chapter-code+examples": ["data.icd10_answers='chapter-code'",
                              "train.loss_average='examples'"],
    "chapter-code+equal": ["data.icd10_answers='chapter-code'", "federation.weighting='equal'"],
    # cyclic weight transfer, each site keeping its AdamW moments: one site a round, 9 rounds,
    # so the same 180 local steps follow one another (3 turns per site)
    "cyclic+keep": CYCLIC,
    "cyclic+keep+chapter-code": [*CYCLIC, "data.icd10_answers='chapter-code'"],
    # FedAvg with fewer local steps between averages (the same 180 steps): under label skew a
    # site's own letter saturates within a few local steps, and only the average of short
    # stretches keeps the description-conditional part growing
    "15x4": ["federation.rounds=15", "train.max_steps=4"],
    "9x7": ["federation.rounds=9", "train.max_steps=7"],
    "15x4+chapter-code": ["federation.rounds=15", "train.max_steps=4",
                          "data.icd10_answers='chapter-code'"],
    # ... with each site continuing its AdamW moments: a fresh AdamW's first steps move every
    # weight by about the learning rate whatever its gradient, which is most of a 4-step round
    "15x4+keep": ["federation.rounds=15", "train.max_steps=4",
                  "federation.local_optimizer='keep'"],
    "30x2+keep": SHORT,
    "60x1+keep": ["federation.rounds=60", "train.max_steps=1",
                  "federation.local_optimizer='keep'"],
    # the main job's shape (30x2+keep) with one change each: a description -> code answer is
    # about 5 tokens, an includes/excludes answer dozens, so a token average gives the task
    # the main job is scored on a small share of each step's gradient
    "30x2+keep+examples": [*SHORT, "train.loss_average='examples'"],
    # ... or the batches made of the questions the main job is scored on (held-out sets keep
    # every kind of question)
    "30x2+keep+desc2code": [*SHORT, "data.icd10_train_tasks=['desc2code']"],
    "30x2+keep+desc2code+code2desc": [*SHORT,
                                      "data.icd10_train_tasks=['desc2code', 'code2desc']"],
    # ... or more of the backbone adapted, or larger steps
    "30x2+keep+mlp": [*SHORT, "lora.include_mlp=true"],
    "30x2+keep+lr-0.006": [*SHORT, "train.lr=0.006"],
    "30x2+keep+mlp+lr-0.006": [*SHORT, "lora.include_mlp=true", "train.lr=0.006"],
    # ... without the chat template's default system message, 16 of an ICD-10 example's 65
    # tokens, which buys 10 examples a step in the time of 8
    "30x2+keep+mlp+lr-0.006+empty-system+batch-10": [
        *SHORT, "lora.include_mlp=true", "train.lr=0.006", "data.system_prompt=''",
        "train.batch_size=10"],
}
"""Variant name -> overrides on top of the scenario (and ``--set``). The first is the
baseline."""

EVAL_LAST_ONLY = ["federation.evaluate_every=1000"]
"""Every variant evaluates its last round only (the rounds between still train and
checkpoint): the main job's evaluation of rounds 1 and 2 changes nothing that is learnt."""


def score_all(scenario: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Category and chapter share on every held-out description -> code question per site,
    pooled as the mean of the sites' shares, with its standard error."""
    from fed_llama.client import site as site_ops
    from fed_llama.evaluation.tasks import evaluate_tasks
    from fed_llama.training import site_model
    from fed_llama.training.method import load_method_state

    loaded = site_model.loaded_site_model(scenario)
    load_method_state(loaded.model, scenario.method, state)
    loaded.model.eval()
    row: dict[str, Any] = {}
    counts: dict[str, int] = {}
    names = scenario.site_names()
    for i, name in enumerate(names):
        report = evaluate_tasks(loaded.model, loaded.tokenizer,
                                site_ops.site_data(scenario, i).heldout_examples,
                                max_questions=1 << 30, seed=scenario.train.seed,
                                tasks=("desc2code",),
                                max_new_tokens=scenario.evaluation.max_new_tokens)
        metrics = report.metrics["desc2code"]
        counts[name] = int(metrics["n"])
        row[f"{name}/category"] = round(metrics["category"], 3)
        row[f"{name}/chapter"] = round(metrics["chapter"], 3)
    row["all_category"] = round(sum(row[f"{n}/category"] for n in names) / len(names), 3)
    row["all_chapter"] = round(sum(row[f"{n}/chapter"] for n in names) / len(names), 3)
    row["all_category_se"] = round(pooled_se(row, counts), 1)
    row["all_questions"] = sum(counts.values())
    return row


def run_variant(scenario_path: Path, overrides: list[str], work: Path) -> dict[str, Any]:
    """Simulate the scenario with ``overrides``; summarize its history and score its last
    round on the whole held-out sets."""
    from fed_llama.launch.simulate import load_scenario, simulate

    started = time.monotonic()
    store = simulate(scenario_path, work, overrides=[*overrides, *EVAL_LAST_ONLY])
    wall = time.monotonic() - started
    history = store.history()
    last = history[-1]
    row: dict[str, Any] = {
        "rounds": len(history),
        "wall_s": round(wall, 1),
        "train_s": round(sum(r["train-phase-seconds"] for r in history), 1),
        "pooled_ppl": round(last["pooled-perplexity"], 2),
        "sample_category": round(last["pooled/desc2code/category"], 3),
        "sample_chapter": round(last["pooled/desc2code/chapter"], 3),
        "sample_questions": int(sum(v for k, v in last.items()
                                    if k.endswith("/desc2code/n") and "pooled" not in k)),
        "bytes_up_per_site": round(statistics.mean(
            v for k, v in last.items() if k.endswith("/bytes-up"))),
    }
    whole, _ = load_scenario(scenario_path, [*overrides, "data.max_heldout_records=0"])
    started = time.monotonic()
    row.update(score_all(whole, store.load_round(len(history))))
    row["score_s"] = round(time.monotonic() - started, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scenario_arguments(parser, "scenario override applied to every variant")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                        help=f"variants to run (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the results file's variants and measure again")
    parser.add_argument("--redo", nargs="+", default=[], choices=list(VARIANTS),
                        metavar="VARIANT", help="measure these variants again (e.g. one whose "
                        "run shared the cores with other work)")
    parser.add_argument("--json", default=str(RESULTS / "learning_per_minute.json"),
                        help="results file (default: benchmarks/results/"
                             "learning_per_minute.json); also where a rerun resumes from")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    out = Path(args.json)
    rows: dict[str, dict[str, Any]] = {}
    if out.exists() and not args.fresh:
        saved = json.loads(out.read_text())
        if saved.get("scenario") == Path(args.scenario).name and \
                saved.get("overrides") == args.overrides:
            rows = {r["variant"]: r for r in saved.get("rows", [])}
        else:
            parser.error(f"{out} holds another scenario or overrides: pass --fresh to "
                         f"replace it, or --json for another file")
    wanted = list(dict.fromkeys([*(args.only or list(VARIANTS)), *args.redo]))
    for name in wanted:
        if name in rows and rows[name]["overrides"] == VARIANTS[name] and name not in args.redo:
            logging.info("%s: measured already (%s)", name, out)
            continue
        with tempfile.TemporaryDirectory(prefix="fed-llama-lpm-") as tmp:
            row = run_variant(Path(args.scenario), [*BASE, *args.overrides, *VARIANTS[name]],
                              Path(tmp) / "run")
        rows[name] = {"variant": name, "overrides": VARIANTS[name], **row}
        logging.info("%s", rows[name])
        save(out, args, rows)
    table = [rows[n] for n in VARIANTS if n in rows]
    base = rows.get("baseline")
    for r in table:
        if base:
            r["train_s_vs_baseline"] = round(r["train_s"] / base["train_s"], 2)
    print(markdown_table(table, ["variant", "rounds", "train_s", "train_s_vs_baseline",
                                 "pooled_ppl", "sample_category", "all_category",
                                 "all_category_se", "all_chapter", "bytes_up_per_site"]))
    save(out, args, rows)
    print(f"wrote {out}")


def save(out: Path, args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> None:
    write_results(out, {"scenario": Path(args.scenario).name, "overrides": args.overrides,
                        "evaluation": "the last round only; sample = the run's own "
                                      "evaluation sample, all = every held-out description "
                                      "-> code question",
                        "rows": [rows[n] for n in VARIANTS if n in rows]})


if __name__ == "__main__":
    main()
