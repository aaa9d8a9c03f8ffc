"""The adapter methods side by side: LoRA, QLoRA, LLaMA-Adapter V1, V2, V2 bias-scale-norm and
LLaMA-Excitor on the same site data, backbone and step budget.

For each method, in three resumable stages (each finished piece is written to the JSON at once
and skipped on the next run; ``--force STAGE`` measures a stage again):

1. ``sweep``: a fair learning rate. ``fed-llama train`` for ``--sweep-steps`` steps at each of
   the method's three candidate rates on the site's *training* data only (its
   ``data.val_fraction`` split is the validation set; the held-out codes are never looked at),
   keeping the rate with the lowest validation perplexity (QLoRA sweeps its own: the NF4
   backbone's rounding changes the loss surface the adapter sees).
2. ``site``: ``fed-llama train`` for ``--steps`` steps at that rate on the ICD-10 site (its
   own process, so peak RSS is the method's): trainable parameters and their share of the
   backbone, the update's bytes per round (the adapter payload a site signs and encrypts),
   local tokens/s, peak RSS, held-out answer perplexity before and after (the issue's target:
   at least 80% lower after 200 steps), and ``fed-llama eval``'s description -> code category
   accuracy.
3. ``federation``: ``benchmarks/federated_vs_local.py`` on a short 3-hospital federation of
   the method (``--fed-rounds`` x ``--fed-steps``) against its local-only and centralized
   runs with the same steps: pooled held-out perplexity and category accuracy (on
   ``--fed-questions`` per task per site; ``federated_beats_local``: the federation's pooled
   perplexity below every local-only adapter's). Changing only its settings keeps the other
   stages' figures. With ``--work`` the federation's run folders stay there
   (``runs-<method>/factors``: its last round is the method's federated adapter). The JSON's
   ``stages_measured`` names, per stage, the runs (date, command) that measured it and for
   which methods;
   its header is the last run's, and each method's ``minutes`` the wall time of each stage.

The whole run is about 4 hours on 2 cores: per method about 9 minutes of sweep (3 rates x 30
steps), 12 of site (200 steps) and 21 of federation, of which about 1 h 50 min is training
steps alone (about 2,800 steps at 2-2.5 s). ``--budget-minutes`` (default 120) bounds one
invocation: it starts no piece that would end past the budget, says what is left, and the
same command run again goes on from the JSON.

    python benchmarks/methods.py          # run it twice: about 2 hours each on 2 cores
    python benchmarks/methods.py --stages site --methods lora excitor
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import HERE, add_json_argument, environment, markdown_table, write_results

METHODS: dict[str, list[str]] = {
    "lora": [],
    "qlora": ["backbone.quantization='nf4'"],
    "llama-adapter": ["adapter.method='llama-adapter'"],
    "llama-adapter-v2": ["adapter.method='llama-adapter-v2'"],
    "v2-bias-scale-norm": ["adapter.method='llama-adapter-v2'",
                           "llama_adapter_v2.prompts=false"],
    "excitor": ["adapter.method='excitor'"],
    # not in the default run: QLoRA with bf16 arithmetic and activation checkpointing, the
    # site-cost issue's lowest-memory setting (train_throughput.py), for what it costs in quality
    "qlora-bf16-ckpt": ["backbone.quantization='nf4'", "backbone.precision='bf16'",
                        "train.activation_checkpointing=true"],
}
"""Each row's ``--set`` overrides of the default train config."""
OPT_IN = ("qlora-bf16-ckpt",)
"""Rows measured only when ``--methods`` names them."""
DEFAULT_METHODS = [m for m in METHODS if m not in OPT_IN]

RATES: dict[str, tuple[float, ...]] = {
    "lora": (3e-4, 1e-3, 3e-3), "qlora": (3e-4, 1e-3, 3e-3),
    "llama-adapter": (1e-3, 5e-3, 2e-2), "llama-adapter-v2": (1e-3, 5e-3, 2e-2),
    "v2-bias-scale-norm": (1e-3, 5e-3, 2e-2), "excitor": (1e-3, 5e-3, 2e-2),
    "qlora-bf16-ckpt": (3e-4, 1e-3, 3e-3),
}
"""Candidate learning rates: around peft's LoRA default, and around the LLaMA-Adapter
papers' 9e-3 (scaled for a batch of 8) for the prompt and bias/scale methods."""

STAGE_MINUTES = {"sweep": 9.0, "site": 12.0, "federation": 21.0}
"""A stage's typical wall time per method on 2 cores with the defaults (measured), for
``--budget-minutes`` until the method's own ``minutes`` are recorded."""

BACKBONE_PARAMETERS = 134_515_008
"""SmolLM2-135M-Instruct's parameters (tied embeddings counted once)."""


def fed_llama(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fed_llama.cli.main", "-q", *args], check=True,
                   stdout=subprocess.DEVNULL)


EXTRA: list[str] = []
"""``--set`` overrides for every run (the command line's)."""


def train(out: Path, sets: list[str]) -> dict[str, Any]:
    """``fed-llama train`` with ``sets``; its metrics."""
    metrics = out.parent / f"{out.name}.json"
    fed_llama("train", "--out", str(out), "--metrics", str(metrics), "--force",
              *[x for s in sets + EXTRA for x in ("--set", s)])
    return dict(json.loads(metrics.read_text()))


def sweep(method: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    source = work / "train.jsonl"
    if not source.is_file():  # the site's training records only; held-out codes left out
        fed_llama("data", "icd10", "--site", args.site, "--out", str(source),
                  "--heldout", str(work / "heldout-unused.jsonl"))
    found = {}
    for lr in RATES[method]:
        m = train(work / f"sweep-{method}-{lr:g}", METHODS[method] + [
            f"data.source='{source}'", f"train.max_steps={args.sweep_steps}",
            f"train.warmup_steps={min(10, args.sweep_steps // 4)}",
            f"train.lr={lr}", f"data.max_heldout_records={args.heldout}"])
        found[f"{lr:g}"] = round(m["heldout_after"]["perplexity"], 3)
        print(f"  sweep {method} lr {lr:g}: validation perplexity {found[f'{lr:g}']}",
              flush=True)
    best = min(found, key=lambda k: found[k])
    return {"validation_ppl_by_lr": found, "lr": float(best)}


def site(method: str, lr: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"site-{method}"
    m = train(out, METHODS[method] + [
        f"data.source='icd10:{args.site}'", f"train.max_steps={args.steps}", f"train.lr={lr}",
        f"train.warmup_steps={min(10, args.steps // 4)}",
        f"data.max_heldout_records={args.heldout}"])
    scores = work / f"eval-{method}.json"
    fed_llama("eval", "--adapter", str(out), "--data", f"icd10:{args.site}", "--max-records",
              str(args.heldout), "--questions", str(args.questions), "--tasks", "desc2code",
              "--json", str(scores))
    category = json.loads(scores.read_text())["tasks"]["desc2code"]["category"]
    payload = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    params = int(m["trainable_parameters"])
    return {"trainable": params, "trainable_pct": round(100 * params / BACKBONE_PARAMETERS, 3),
            "bytes_per_round": payload, "tokens_per_s": m["train"]["tokens_per_second"],
            "peak_rss_mb": m["peak_rss_mb"],
            "ppl_before": round(m["heldout_before"]["perplexity"], 2),
            "ppl_after": round(m["heldout_after"]["perplexity"], 2),
            "reduction": round(m["perplexity_reduction"], 4),
            "category": round(category, 3), "steps": m["train"]["steps"]}


def federation(method: str, lr: float, args: argparse.Namespace, work: Path
               ) -> dict[str, Any]:
    out = work / f"federation-{method}.json"
    # the federation's own per-round evaluation is turned off (the script evaluates its last
    # round like every other variant): it does not change a figure, only the wall time
    sets = METHODS[method] + EXTRA + [f"train.lr={lr}", f"federation.rounds={args.fed_rounds}",
                                      f"train.max_steps={args.fed_steps}",
                                      "evaluation.questions=0",
                                      f"federation.evaluate_every={args.fed_rounds}"]
    subprocess.run([sys.executable, str(HERE / "federated_vs_local.py"), "--modes", "factors",
                    "--skip", "base", "--questions", str(args.fed_questions),
                    "--json", str(out), "--resume", "--runs", str(work / f"runs-{method}"),
                    *[x for s in sets for x in ("--set", s)]], check=True)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    fed, central = rows["federated:factors"], rows["centralized"]
    local = [r for v, r in rows.items() if v.startswith("local:")]
    return {"fed_ppl": fed["pooled_ppl"], "fed_category": fed.get("pooled_category"),
            "central_ppl": central["pooled_ppl"],
            "best_local_ppl": min(r["pooled_ppl"] for r in local),
            "federated_beats_local": all(fed["pooled_ppl"] < r["pooled_ppl"] for r in local)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--stages", nargs="+", default=["sweep", "site", "federation"],
                        choices=["sweep", "site", "federation"])
    parser.add_argument("--force", nargs="*", default=[], choices=["sweep", "site", "federation"])
    parser.add_argument("--site", default="cardiology")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sweep-steps", type=int, default=30)
    parser.add_argument("--fed-rounds", type=int, default=2)
    parser.add_argument("--fed-steps", type=int, default=10)
    parser.add_argument("--heldout", type=int, default=128, help="held-out records evaluated")
    parser.add_argument("--questions", type=int, default=32, help="questions per task")
    parser.add_argument("--fed-questions", type=int, default=8,
                        help="questions per task per site in the federation stage (its 5 "
                             "models x 3 sites answer them)")
    parser.add_argument("--budget-minutes", type=float, default=120,
                        help="start no piece (a method's stage) that would end past this many "
                             "minutes (by its last measured or typical duration; at least one "
                             "piece runs); the next run of the same command goes on; 0: no "
                             "budget")
    parser.add_argument("--work", help="keep adapters and partial files here (default: temp)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="an override for every training run (e.g. another backbone)")
    add_json_argument(parser, "methods.json")
    args = parser.parse_args()
    EXTRA.extend(args.overrides)
    path = Path(args.json)
    setup = {"overrides": args.overrides, "site": args.site, "steps": args.steps,
             "sweep_steps": args.sweep_steps,
             "fed_rounds": args.fed_rounds, "fed_steps": args.fed_steps,
             "fed_questions": args.fed_questions,
             "heldout": args.heldout, "questions": args.questions}
    saved = json.loads(path.read_text()) if path.is_file() else {}
    rows = resumable(saved, setup)
    measured: dict[str, Any] = dict(saved.get("stages_measured", {})) if rows else {}
    for stage, runs in measured.items():  # a file from before per-method records: one run
        if isinstance(runs, str):
            measured[stage] = {runs: [m for m, r in rows.items() if stage in r]}
    now = environment()
    run = f"{now.get('date')}: {now.get('command')}"  # (the header names the last commit)
    with tempfile.TemporaryDirectory(prefix="fed-llama-methods-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        began, done, left = time.perf_counter(), 0, []
        for method in args.methods:
            row = rows.setdefault(method, {"method": method})
            for stage in args.stages:
                if stage in row and stage not in args.force:
                    continue
                spent = (time.perf_counter() - began) / 60
                expected = row.get("minutes", {}).get(stage, STAGE_MINUTES[stage])
                if left or (done and args.budget_minutes
                            and spent + expected > args.budget_minutes):
                    left.append(f"{method} {stage}")  # the rest waits for the next run
                    continue
                lr = row.get("sweep", {}).get("lr", RATES[method][1])
                start = time.perf_counter()
                if stage == "sweep":
                    row["sweep"] = sweep(method, args, work)
                elif stage == "site":
                    row["site"] = site(method, lr, args, work)
                else:
                    row["federation"] = federation(method, lr, args, work)
                record(measured, stage, run, method)
                row.setdefault("minutes", {})[stage] = round((time.perf_counter() - start) / 60,
                                                             1)
                print(f"  {method} {stage}: {row[stage]}", flush=True)
                write_results(path, {**results(setup, rows), "stages_measured": measured})
                done += 1
    if left:
        print(f"stopped before the {args.budget_minutes}-minute budget "
              f"({(time.perf_counter() - began) / 60:.0f} min spent); not measured yet: "
              f"{', '.join(left)}. Run the same command again (without --force) to go on.")
    print(markdown_table(flat_rows(rows), COLUMNS))
    write_results(path, {**results(setup, rows), "stages_measured": measured})
    print(f"written to {path}")


def record(measured: dict[str, Any], stage: str, run: str, method: str) -> None:
    """Note in ``measured`` that ``run`` measured ``stage`` of ``method`` (and no other run
    holds that method's figures of the stage any more)."""
    runs = measured.get(stage, {})
    for methods in runs.values():
        if method in methods:
            methods.remove(method)
    runs.setdefault(run, []).append(method)
    measured[stage] = {r: m for r, m in runs.items() if m or r == run}


FEDERATION_SETTINGS = ("fed_rounds", "fed_steps", "fed_questions")
"""The settings only the ``federation`` stage depends on."""


def resumable(saved: dict[str, Any], setup: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The measured stages of ``saved`` that ``setup`` can keep: none when a setting of the
    sweep and site stages changed; every stage but ``federation`` when only its settings did."""
    before = saved.get("setup", {})

    def part(d: dict[str, Any], fed: bool) -> dict[str, Any]:
        return {k: d.get(k) for k in setup if (k in FEDERATION_SETTINGS) == fed}

    if part(before, False) != part(setup, False):
        return {}
    rows: dict[str, dict[str, Any]] = saved.get("methods", {})
    if part(before, True) != part(setup, True):
        for row in rows.values():
            row.pop("federation", None)
    return rows


COLUMNS = ["method", "lr", "trainable", "trainable_pct", "bytes_per_round", "tokens_per_s",
           "peak_rss_mb", "ppl_before", "ppl_after", "reduction", "target_80pct", "category",
           "fed_ppl", "fed_category", "best_local_ppl", "central_ppl", "federated_beats_local"]
"""The table's columns (a stage not run leaves its columns out of that row)."""


def flat_rows(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per method: its rate, site and federation figures."""
    table = []
    for m, r in rows.items():
        row = {"method": m, "lr": r.get("sweep", {}).get("lr"), **r.get("site", {}),
               **r.get("federation", {})}
        if "reduction" in row:
            row["target_80pct"] = row["reduction"] >= 0.8
        table.append({k: row[k] for k in COLUMNS if k in row})
    return table


def results(setup: dict[str, Any], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON: the setup, the table (``rows``), the sweep's validation perplexities
    (``sweep``) and each method's stages as measured (``methods``: what a resumed run skips)."""
    sweep = [{"method": m, "lr": r["sweep"]["lr"],
              **{f"val_ppl@{k}": v for k, v in r["sweep"]["validation_ppl_by_lr"].items()}}
             for m, r in rows.items() if "sweep" in r]
    return {"setup": setup, "rows": flat_rows(rows), "sweep": sweep, "methods": rows}


if __name__ == "__main__":
    main()
