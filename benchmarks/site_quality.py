"""Does local training help? LoRA and QLoRA on one ICD-10 site, on the default backbone.

Runs ``fed-llama train`` once per method, each in its own process (so peak RSS is that
method's), and prints held-out perplexity before and after, the reduction, wall time and peak
memory, and task accuracy from ``fed-llama eval`` (greedy answers to held-out questions:
description -> code exact and category match, code -> description token F1) for the base model
and each adapter. Writes the table as JSON (shown in docs/benchmarks.md).

    python benchmarks/site_quality.py --site cardiology --steps 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import add_json_argument, markdown_table, write_results


def task_scores(args: argparse.Namespace, work: Path, adapter: Path | None) -> dict[str, float]:
    """Greedy task accuracy on the same held-out sample the training run evaluated."""
    out = work / f"eval-{adapter.name if adapter else 'base'}.json"
    cmd = [sys.executable, "-m", "fed_llama.cli.main", "-q", "eval", "--data",
           f"icd10:{args.site}", "--max-records", str(args.heldout), "--questions",
           str(args.questions), "--tasks", "desc2code,code2desc", "--json", str(out)]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    tasks = result["tasks"]
    return {"ppl": round(result["perplexity"], 2),
            "code_exact": round(tasks["desc2code"]["exact"], 3),
            "code_category": round(tasks["desc2code"]["category"], 3),
            "desc_f1": round(tasks["code2desc"]["f1"], 3)}


def run_method(method: str, args: argparse.Namespace, work: Path) -> dict[str, object]:
    out, metrics = work / method, work / f"{method}.json"
    cmd = [sys.executable, "-m", "fed_llama.cli.main", "-q", "train", "--out", str(out),
           "--metrics", str(metrics), "--set", f"data.source='icd10:{args.site}'",
           "--set", f"train.max_steps={args.steps}",
           "--set", f"data.max_heldout_records={args.heldout}"]
    if method == "qlora":
        cmd += ["--set", "backbone.quantization='nf4'"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    m = json.loads(metrics.read_text())
    scores = task_scores(args, work, out)
    return {"method": method, "steps": m["train"]["steps"],
            "train_minutes": round(m["train"]["seconds"] / 60, 2),
            "wall_minutes": round(wall / 60, 2),
            "ppl_before": round(m["heldout_before"]["perplexity"], 2),
            "ppl_after": round(m["heldout_after"]["perplexity"], 2),
            "reduction": round(m["perplexity_reduction"], 4),
            "tokens_per_s": m["train"]["tokens_per_second"],
            "peak_rss_mb": m["peak_rss_mb"],
            "code_exact": scores["code_exact"], "code_category": scores["code_category"],
            "desc_f1": scores["desc_f1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="cardiology")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--heldout", type=int, default=256, help="held-out records evaluated")
    parser.add_argument("--questions", type=int, default=64, help="questions per task")
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"],
                        choices=["lora", "qlora"])
    add_json_argument(parser, "site_quality.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = task_scores(args, Path(tmp), None)
        rows = [{"method": "base (no adapter)", "steps": 0, "train_minutes": 0.0,
                 "wall_minutes": 0.0, "ppl_before": base["ppl"], "ppl_after": base["ppl"],
                 "reduction": 0.0, "tokens_per_s": 0.0, "peak_rss_mb": 0.0,
                 "code_exact": base["code_exact"], "code_category": base["code_category"],
                 "desc_f1": base["desc_f1"]}]
        rows += [run_method(m, args, Path(tmp)) for m in args.methods]
    cols = list(rows[0])
    print(f"site {args.site}, {args.steps} steps, {args.heldout} held-out records "
          "(codes unseen in training)")
    print(markdown_table(rows, cols))
    write_results(args.json, {"site": args.site, "rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
