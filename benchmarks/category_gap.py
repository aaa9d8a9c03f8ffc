"""A federated adapter's task-accuracy lead over local-only adapters, on the whole held-out set.

``federated_vs_local.py`` scores every variant on a seeded sample of each site's held-out set
(by default 128 records, about 32 description -> code questions per site), so one answer moves
a site's category accuracy by about 3 points. This script measures the same comparison on
every held-out record of every site (cardiology 421, oncology 434, psychiatry 321 in
``hospitals-3``): it loads the last round of a saved federated run (``--runs`` of
``federated_vs_local.py``), trains the local-only adapters exactly as that script does (the
same scenario, overrides, seed and R·S steps), first measures them on the benchmark's own
sample (rows to compare with that script's: the same figures mean the same adapters), then
scores the federated and local adapters on the whole held-out sets. It prints a table, the
category points of the federated adapter over the best local one with the standard error of
each pooled share, and writes JSON.

    python benchmarks/category_gap.py --run runs/fvl10/cyclic+keep \\
        --set federation.rounds=10 --set evaluation.questions=0 --local cardiology
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import tomllib
from pathlib import Path
from typing import Any

from federated_vs_local import measure, train_fresh
from harness import RESULTS, add_scenario_arguments, markdown_table, write_results


def pooled_se(row: dict[str, Any], counts: dict[str, int]) -> float:
    """Standard error, in points, of the pooled category share (the mean of the sites' shares,
    each a binomial proportion over that site's questions)."""
    var = sum(row[f"{n}/category"] * (1 - row[f"{n}/category"]) / max(c, 1)
              for n, c in counts.items())
    return 100 * math.sqrt(var) / len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path,
                        help="a federated run folder (its last complete round is scored)")
    add_scenario_arguments(parser, "scenario override, as given to federated_vs_local.py")
    parser.add_argument("--local", nargs="+", default=None, metavar="SITE",
                        help="local-only adapters to train (default: every site)")
    parser.add_argument("--questions", type=int, default=32,
                        help="the benchmark's questions per task per site (re-measure check)")
    parser.add_argument("--json", help="results file (default: benchmarks/results/"
                        "category_gap_<R>rounds.json, R the scenario's rounds)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from fed_llama.client import site as site_ops
    from fed_llama.evaluation.tasks import choose_questions
    from fed_llama.launch.simulate import load_scenario
    from fed_llama.server.checkpoint import RunStore

    sample, text = load_scenario(Path(args.scenario), args.overrides)
    whole, _ = load_scenario(Path(args.scenario),
                             [*args.overrides, "data.max_heldout_records=0"])
    names = sample.site_names()
    local = names if args.local is None else args.local
    unknown = sorted(set(local) - set(names))
    if unknown:
        parser.error(f"--local {unknown}: not a site of {args.scenario} (sites: {names})")
    store = RunStore(args.run)
    last = store.completed_rounds()
    if last == 0:
        parser.error(f"--run {str(args.run)!r} holds no completed round")
    run_sites, sites = (tomllib.loads(t).get("federation", {}).get("sites")
                        for t in ((args.run / "scenario.toml").read_text(), text))
    if run_sites != sites:
        parser.error(f"--run {str(args.run)!r} federated the sites {run_sites}, not the "
                     f"scenario's {sites}: pass the --scenario and --set it was run with")
    per_site = sample.federation.rounds * sample.train.max_steps
    states = {f"federated ({args.run.name}, round {last})": store.load_round(last)}
    rows: list[dict[str, Any]] = []
    for name in local:
        start = time.perf_counter()
        states[f"local:{name}"] = train_fresh(
            sample, site_ops.site_data(sample, names.index(name)).train, per_site,
            f"local {name}")
        check = measure(sample, states[f"local:{name}"], args.questions)
        rows.append({"variant": f"local:{name}", "heldout": "benchmark sample", "steps": per_site,
                     **check, "minutes": round((time.perf_counter() - start) / 60, 2)})
        logging.info("%s", rows[-1])
    # after the local training: site_ops holds one scenario's backbone and data at a time
    counts = {n: len(choose_questions(site_ops.site_data(whole, i).heldout_examples, 1 << 30,
                                      0, ("desc2code",)))
              for i, n in enumerate(names)}
    every = max(counts.values())  # questions per task: all of every site's
    for variant, state in states.items():
        start = time.perf_counter()
        row = measure(whole, state, every)
        rows.append({"variant": variant, "heldout": "all", "steps": per_site * (
            len(names) if variant.startswith("federated") else 1), **row,
            "pooled_category_se": round(pooled_se(row, counts), 1),
            "minutes": round((time.perf_counter() - start) / 60, 2)})
        logging.info("%s", rows[-1])

    print(f"{Path(args.scenario).name} {' '.join(args.overrides)}: description -> code "
          f"questions per site on the whole held-out set: "
          + ", ".join(f"{n} {c}" for n, c in counts.items()))
    cols = ["variant", "heldout", "steps", "pooled_ppl", *[f"{n}/category" for n in names],
            "pooled_category", "pooled_desc_f1", "minutes"]
    print(markdown_table(rows, cols))
    full = [r for r in rows if r["heldout"] == "all"]
    fed, best = full[0], max(full[1:], key=lambda r: r["pooled_category"], default=None)
    gap = None
    if best is not None:
        gap = round(100 * (fed["pooled_category"] - best["pooled_category"]), 1)
        print(f"{fed['variant']}: category points over the best local adapter "
              f"({best['variant']}) on the whole held-out set = {gap} (target >= 20); "
              f"standard error of each pooled share: {fed['pooled_category_se']} and "
              f"{best['pooled_category_se']} points")
    out = Path(args.json or RESULTS / f"category_gap_{sample.federation.rounds}rounds.json")
    write_results(out, {"scenario": Path(args.scenario).name, "overrides": args.overrides,
                        "questions_per_site": counts, "rows": rows,
                        "category_points_over_best_local": gap})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
