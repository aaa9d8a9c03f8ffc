"""Write docs/benchmarks.md from benchmarks/results/*.json: the only way figures reach docs/.

Every results file becomes one section: what it measures, a header (date, commit, CPU and its
flags, library versions, the command; "not recorded" where the file does not say), its
settings, and its tables, exactly as the JSON holds them. ``tests/test_docs.py`` fails when the
committed page differs from what this script makes of the committed JSON, and when the README's
headline table differs from :func:`headline_table`.

    python benchmarks/report.py            # rewrite docs/benchmarks.md
    python benchmarks/report.py --check    # exit 1 if docs/benchmarks.md is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness import LIBRARIES, RESULTS, ROOT, markdown_table

DOC = ROOT / "docs" / "benchmarks.md"
NOT_RECORDED = "not recorded"
HEADLINE = "federated_vs_local_15rounds.json"
"""The results file the README's headline table is taken from."""

# (results file stem, section title, what it measures): the page's order; a file not listed
# here still gets its section, after these, under its own name
SECTIONS: list[tuple[str, str, str]] = [
    ("federated_vs_local_3rounds", "Federated vs local vs centralized: 3 rounds",
     "The main job's scenario (`simulations/hospitals-3.toml`) measured every way on the same "
     "backbone, data and total training steps: the untrained adapter (`base`), each site alone "
     "(`local:<site>`, the steps it spends in the federation), all sites' data pooled "
     "(`centralized`, the federation's total steps) and the federation in several aggregation "
     "modes (`federated:<mode>`, run with `fed-llama simulate`). Held-out answer perplexity per "
     "site and pooled; `category` is the share of held-out descriptions answered with a code of "
     "the right three-character ICD-10 category, `desc_f1` the token F1 of code -> description "
     "answers. `cyclic+keep` is cyclic weight transfer with each site keeping its AdamW moments. "
     "The targets table compares every federated row with centralized and the best local-only "
     "adapter."),
    ("federated_vs_local_10rounds", "Federated vs local vs centralized: 10 rounds",
     "The same comparison over 10 rounds of the same scenario."),
    ("federated_vs_local_15rounds", "Federated vs local vs centralized: 15 rounds",
     "The same comparison over 15 rounds of the same scenario. The README's headline table is "
     "taken from this file."),
    ("category_gap_10rounds", "Task accuracy on every held-out record: 10 rounds",
     "The federated adapter of the 10-round comparison (its last round) and a local-only "
     "adapter trained exactly as that benchmark trains it, scored on every description -> code "
     "question of every site's held-out set instead of a sample (`heldout = all`); the "
     "`benchmark sample` row repeats the comparison's own row as a check that it is the same "
     "adapter. `pooled_category_se` is the standard error, in points, of the pooled share."),
    ("category_gap_15rounds", "Task accuracy on every held-out record: 15 rounds",
     "The same whole-held-out-set scoring for the 15-round federation."),
    ("site_quality", "What local training does",
     "`fed-llama train` with the default config on one site, LoRA and QLoRA (NF4 backbone), each "
     "in its own process: held-out perplexity before and after, wall time, peak memory, and "
     "`fed-llama eval`'s greedy task scores (held-out codes never appear in training, so "
     "`code_exact` stays at 0; `code_category` is the one to compare)."),
    ("train_throughput", "Training throughput",
     "`fed-llama train`'s loop against a minimal hand-written peft + torch loop on the same data, "
     "batch size and LoRA, each in a fresh process; tokens are real (non-padding) tokens."),
    ("site_scale", "Training cost against model size",
     "`train_throughput.py`'s fed-llama rows (LoRA on the fp32 backbone, QLoRA, and QLoRA with "
     "activation checkpointing) on the default backbone and on random-initialized LLaMA shapes "
     "of about 0.5B and 1.1B parameters (TinyLlama-1.1B's), built by the script: speed and "
     "memory only, each row in a fresh process on the same site data and batch size. The fits "
     "table is a least-squares line through each mode's peak RSS against parameters and where "
     "it reaches this machine's 24 GiB: an extrapolation, not a measurement."),
    ("privacy_overhead", "What privacy costs",
     "A short federation run once per privacy setting through `fed-llama simulate`: `plain` "
     "(Flower's messages only), `envelopes` (signed, HPKE-encrypted updates and signed rounds: "
     "the default), `envelopes+dp` (client-level differential privacy; `z` is the noise "
     "multiplier, with the epsilon reached) and `secagg+` (Flower's SecAgg+). Ratios are to "
     "`plain` in the same run; `train_phase_x_plain` isolates what privacy costs. The "
     "utility-vs-epsilon plot is `benchmarks/results/privacy_utility.png`."),
    ("poisoning", "Against a poisoning site",
     "Four sites, one of which sends the global adapter plus a large multiple of its honest "
     "change every round (the `poison` settings), with no defence, with the coordinate-wise "
     "median, and with the default norm-outlier refusal; `ppl_x_clean` is pooled perplexity "
     "over the clean run's, `within_5pct` the privacy issue's target."),
    ("edge", "Edge export: every variant",
     "A federated round's adapter merged once and built into every ONNX variant with the code "
     "of `fed-llama export`, against PyTorch eager fp32: size, prefill latency (256 tokens), "
     "decode tokens/s (64 tokens, median of the repeats; `decode_x_pytorch` is the median of "
     "ratios to PyTorch measured right beside each variant), `in_place_gain` (the KV cache "
     "updated in place vs fed back as arrays), held-out perplexity and its change, greedy "
     "top-1 agreement with PyTorch, task scores, and the fraction of the memory-bandwidth bound "
     "reached. Decode speed depends on the CPU's instruction set far more than on anything "
     "else: read it with the header's CPU flags."),
    ("edge_target_variants_5repeats", "Edge export: the two target variants, five repeats",
     "The int8 and the GPTQ int4 with an 8-bit LM head variants measured again with five "
     "paired repeats instead of three."),
    ("edge_methods", "Edge export: every adapter method",
     "One site adapter per method other than LoRA (LLaMA-Adapter V1, V2 with prompts, V2's "
     "bias-scale-norm recipe, Excitor; `fed-llama train`, 60 steps on the cardiology site) "
     "exported through the builder's graph (`fp32`, `int8`: the branches that do not fold "
     "grafted onto it as fp32 constants, docs/edge.md section 6) and through the plain "
     "`torch.onnx` route (`torch-fp32`, `torch-int8`: the branches traced; 8-bit weights and "
     "8-bit activations), each against PyTorch eager fp32 of the same adapter (branches kept, "
     "V2's foldable parts folded) in the same run: the columns of the section above, one block "
     "of rows per method. LoRA's rows are in the section above."),
    ("drills", "The Deployment Engine under load and faults",
     "A real SuperLink (TLS, SuperNode authentication) and SuperNodes on loopback, the run "
     "submitted with `flwr run`, faults injected with process signals (docs/deployment.md, "
     "\"Fault drills\"). Each drill's `result` is computed from the run folder: history rows "
     "and checkpoints (`rounds lost`: rounds without both; `rounds applied twice`: a round "
     "trained again after a restart, or whose seal does not seal the previous round's "
     "checkpoint), the round-seal chain verified end to end, and the processes' exits. "
     "`overhead` is per round of the `scale` drills (`scale`: 16 SuperNodes on the tiny "
     "model; `scale-real`: 4 on the default backbone): the round's wall time "
     "minus the slowest site's training time and its evaluation time (where the sites "
     "report it), which leaves messaging, each message's ClientApp process start and "
     "backbone load, and checkpointing; `flower_s` (where the sites report their load "
     "times) leaves out the sites' backbone and data loads as well: the round less the "
     "slowest site's load and training and the slowest site's load and evaluation; "
     "`peak_rss_mb` is the SuperLink's and the "
     "ServerApp's peak resident set (VmHWM) per `scale` drill."),
    ("drills_carry", "The Deployment Engine: evaluation carried by the next round's training",
     "The `scale-real` drill (4 SuperNodes on the default backbone, 3 rounds) with "
     "`federation.carry_evaluation` (`scale-real`: a round's training messages first evaluate "
     "the previous round's adapter, so a site starts one ClientApp process a round; the last "
     "round still evaluates in messages of its own) and without it (`scale-real-no-carry`: "
     "every round evaluates in messages of its own, two processes per site per round), one "
     "after the other in one run of `drills.py` on one host. `overhead` as in the section "
     "above, with a carried evaluation counted in the training phase that did it."),
    ("methods", "The adapter methods side by side",
     "LoRA, QLoRA (LoRA on the NF4 backbone), LLaMA-Adapter V1, V2, V2's bias-scale-norm "
     "recipe (no prompts) and LLaMA-Excitor on one ICD-10 site, the same backbone and the same "
     "step budget, each `fed-llama train` in its own process at the learning rate its sweep "
     "chose (the lowest validation perplexity after the sweep's steps on the site's training "
     "data; QLoRA sweeps its own). `minutes` (in the JSON) is each stage's wall time per "
     "method. `bytes_per_round` is the adapter payload a site signs and "
     "encrypts, `trainable_pct` its share of the backbone's parameters, `reduction` the held-out "
     "answer perplexity's fall after the steps (`target_80pct`: the adapter-methods issue's "
     "target), `category` `fed-llama eval`'s description -> code category accuracy on the "
     "held-out sample. Federation columns appear for methods whose `federation` stage ran."),
    ("compression", "Compressed updates",
     "The main job's federation (3 hospitals, 30 rounds of 2 local steps, LoRA on attention "
     "and MLP, envelopes on) once per `federation.update_compression` through `fed-llama "
     "simulate`, with the overrides shown (no task questions): bytes each site sent per round "
     "(the envelope) and pooled held-out perplexity after each evaluated round (the main job "
     "evaluates after its last); ratios are to `none` in the same run of the script, one run "
     "per variant."),
    ("learning_per_minute", "What the main job learns of its task",
     "The main job's scenario as it was before this comparison (`simulations/hospitals-3.toml`"
     ": 3 hospitals, 3 rounds of FedAvg of 20 local steps) once per variant through `fed-llama "
     "simulate`, each a few overrides of it; every variant evaluates its last round only. "
     "`RxS` variants take the same 180 local steps as R rounds of S steps; `+keep`: each site "
     "keeps its AdamW moments between rounds; `30x2+keep+...` variants change one thing of "
     "`30x2+keep` (`+mlp`: LoRA on the MLP projections too; `+empty-system`: an empty system "
     "message instead of the chat template's default; the last row is the main job since). "
     "`sample_category` is the pooled description -> code category share on the run's own "
     "evaluation sample (16 questions per site, as the main job printed it then); "
     "`all_category` the same on every held-out description -> code question of every site "
     "(`all_questions`), with its standard error in points "
     "(`all_category_se`); `all_chapter` the share with the right first letter. `train_s` is "
     "the rounds' training phases; `baseline` is the scenario as it was before this "
     "comparison. One run per variant."),
]
SCRIPTS = {"federated_vs_local": "federated_vs_local.py", "category_gap": "category_gap.py",
           "edge": "edge.py", "site_quality": "site_quality.py",
           "train_throughput": "train_throughput.py", "privacy_overhead": "privacy_overhead.py",
           "poisoning": "poisoning.py", "drills": "drills.py",
           "compression": "compression.py", "methods": "methods.py",
           "site_scale": "site_scale.py", "learning_per_minute": "learning_per_minute.py"}
TABLES = ("rows", "variants", "targets", "overhead", "sweep", "fits")
"""A results file's keys that become tables (``variants``: one row per variant)."""
CAPTIONS = {"targets": "Targets:", "overhead": "Flower's overhead per round:",
            "sweep": "Learning-rate sweep (validation perplexity at each candidate rate):",
            "fits": "Peak RSS against parameters (MB = intercept + slope x billions), and the "
                    "largest LLaMA that fits:"}
META = {"environment", "machine"}
"""Keys that go into a section's header, not its settings or tables."""
RESUME_STATE = {"methods"}
"""Keys a script keeps to resume from (what its tables are made of), not shown."""


def load_results(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every results file by its stem, in the page's order."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    order = [stem for stem, _, _ in SECTIONS if stem in found]
    return {stem: found[stem] for stem in order + sorted(set(found) - set(order))}


def header(data: Mapping[str, Any]) -> list[str]:
    """Date, commit, CPU and flags, library versions and the command of one results file,
    from its ``environment`` block (or an older ``machine`` block); "not recorded" for each
    one the file does not hold."""
    env, machine = data.get("environment") or {}, data.get("machine") or {}
    versions = dict(env.get("versions") or {})
    for name in LIBRARIES:  # an older file's machine block names some of them
        versions.setdefault(name, machine.get(name))
    flags = env.get("cpu_flags", machine.get("isa"))
    cpu = env.get("cpu") or machine.get("cpu")
    cores = env.get("cores") or machine.get("cores")
    python = env.get("python")
    libraries = ", ".join(f"{n} {versions.get(n) or NOT_RECORDED}" for n in LIBRARIES)

    def given(value: Any) -> str:
        return str(value) if value not in (None, "") else NOT_RECORDED

    return [f"- date: {given(env.get('date'))}",
            f"- commit: {given(env.get('commit'))}",
            f"- CPU: {given(cpu)}" + (f", {cores} cores" if cores else "")
            + f"; flags: {' '.join(flags) if flags else NOT_RECORDED}",
            f"- libraries: python {python or NOT_RECORDED}, {libraries}",
            "- command: " + (f"`{env['command']}`" if env.get("command") else NOT_RECORDED)]


def _value(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value) if value else "none"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _columns(rows: list[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def tables(data: Mapping[str, Any]) -> list[str]:
    """A results file's settings (its scalar and short fields) and its tables
    (:data:`TABLES`), every key a column."""
    out: list[str] = []
    settings = [f"- {key}: {_value(value)}" for key, value in data.items()
                if key not in META and key not in TABLES and key not in RESUME_STATE]
    if settings:
        out += ["Settings and summary:", "", *settings, ""]
    for key in TABLES:
        if key not in data:
            continue
        value = data[key]
        rows = ([{"variant": name, **row} for name, row in value.items()]
                if isinstance(value, Mapping) else list(value))
        if not rows:
            out += [f"{key}: none", ""]
            continue
        if key in CAPTIONS:
            out += [CAPTIONS[key], ""]
        out += [markdown_table(rows, _columns(rows)), ""]
    return out


def section(stem: str, data: Mapping[str, Any]) -> list[str]:
    title, about = next(((t, a) for s, t, a in SECTIONS if s == stem), (stem, ""))
    script = next((f for prefix, f in SCRIPTS.items() if stem.startswith(prefix)), None)
    source = f"`benchmarks/results/{stem}.json`" + (
        f", written by `benchmarks/{script}`" if script else "")
    return [f"## {title}", "", *([about, ""] if about else []), f"Source: {source}.", "",
            *header(data), "", *tables(data)]


def render(results: Path = RESULTS) -> str:
    """The whole of docs/benchmarks.md."""
    found = load_results(results)
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do "
             "not edit by hand (a test fails when this page and the results files disagree). "
             "Each section is one results file: what it measures, where and how it was "
             "measured (\"not recorded\" where the file does not say), its settings and its "
             "tables as the file holds them. Perplexities are held-out answer perplexities; "
             "shares (`category`, `desc_f1`, `top1`) are between 0 and 1.", "",
             "## Contents", ""]
    for stem in found:
        title = next((t for s, t, _ in SECTIONS if s == stem), stem)
        anchor = "".join(c for c in title.lower().replace(" ", "-")
                         if c.isalnum() or c in "-_")
        lines.append(f"- [{title}](#{anchor})")
    lines.append("")
    for stem, data in found.items():
        lines += section(stem, data)
    return "\n".join(lines).rstrip("\n") + "\n"


def headline_table(results: Path = RESULTS) -> str:
    """The README's table: the base model, the best local-only adapter, centralized training
    and the federation, from :data:`HEADLINE` (pooled held-out perplexity and category
    accuracy over every site)."""
    rows = json.loads((results / HEADLINE).read_text())["rows"]
    locals_ = [r for r in rows if r["variant"].startswith("local:")]
    picked = ([r for r in rows if r["variant"] == "base"]
              + ([max(locals_, key=lambda r: r["pooled_category"])] if locals_ else [])
              + [r for r in rows if r["variant"] == "centralized"]
              + [r for r in rows if r["variant"].startswith("federated:")])
    names = {"base": "base model, no adapter", "centralized": "centralized (data pooled)"}
    shown = [{"model": names.get(r["variant"], r["variant"].replace("local:", "best local-only: ")
                                 .replace("federated:", "federated: ")),
              "training steps": r["steps"], "pooled held-out perplexity": r["pooled_ppl"],
              "category accuracy": f"{100 * r['pooled_category']:.1f}%"} for r in picked]
    return markdown_table(shown, list(shown[0]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that docs/benchmarks.md is up to date (exit 1 if not)")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC.relative_to(ROOT)} is stale: run python benchmarks/report.py",
                  file=sys.stderr)
            return 1
        print(f"{DOC.relative_to(ROOT)} is up to date")
        return 0
    from fed_llama.common.files import write_text_atomic

    write_text_atomic(DOC, text)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
