"""Edge variants of one adapter, measured in one run against PyTorch eager fp32.

The adapter (default: round 3 of ``simulations/hospitals-3.toml``, which the README's main job
writes) is merged once; each ONNX variant is built with the same code as ``fed-llama export``
and measured on the same held-out records of every site of the adapter:

- size (MB of model files), prefill latency for 256 tokens, decode tokens/s for 64 tokens with
  the KV cache (median of ``--repeats``), decoding as ``fed-llama generate`` does (the cache
  updated in place) and, for ``in_place_gain``, with the cache fed back as arrays each step;
- held-out answer perplexity and greedy next-token (top-1) agreement with PyTorch fp32, and
  greedy task scores (description -> code category match, code -> description token F1);
- this machine's memory bandwidth (fp32 matrix-vector, measured here first), the decode speed
  it would allow if every weight byte were read once per token, and each variant's fraction.

``onnx-torch-*`` is the plain route (``exporter = "torch"``: ``torch.onnx.export`` of the
merged model with a KV cache, run by the same runtime; int8 round-to-nearest, int4 GPTQ),
beside the builder's graphs, onto which the branches of the adapter methods that do not fold
(prompts, the Excitor's keys) are grafted (pass one adapter per method to ``--adapter``: each
gets its own PyTorch row); ``torch-int8-fp32-compute`` is
``torch-int8`` with fp32 arithmetic on the 8-bit weights (``accuracy_level = 1``) instead of
8-bit activations (4, the default), for what the faster arithmetic costs in quality; the
int4 variants are the builder's quantizers (round-to-nearest, k-quant) with and without
8-bit LM head and sensitive layers, and GPTQ (``algorithm = "gptq"``: calibrated on 64 training
records per site, none of them among the held-out records measured here).

Ratios are to PyTorch eager fp32 measured in this run, right beside each variant's own
measurement (the median of the paired ratios: this machine's speed drifts over a run).
Targets (edge issue): ONNX fp32 logits within 1e-3; int8 perplexity within 2% of PyTorch fp32
and int4 within 15%; int4 at most 20% of the fp32 ONNX size; int8 decode at least 7x PyTorch
eager and int4 at least 8x.

    python benchmarks/edge.py                       # about 40 minutes on 2 cores
    python benchmarks/edge.py --adapter runs/cardiology --variants fp32 int8
    python benchmarks/edge.py --adapter runs/v1 runs/excitor --variants torch-fp32 torch-int8 \
        --json benchmarks/results/edge_methods.json
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import ROOT, add_json_argument, cpu, markdown_table, write_results

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"quant": "fp32"},
    "torch-fp32": {"quant": "fp32", "exporter": "torch"},
    "torch-int8": {"quant": "int8", "exporter": "torch"},
    "torch-int8-fp32-compute": {"quant": "int8", "exporter": "torch", "accuracy_level": 1},
    "torch-int4-gptq": {"quant": "int4", "exporter": "torch", "algorithm": "gptq"},
    "int8": {"quant": "int8"},
    "int4-default": {"quant": "int4", "algorithm": "default"},
    "int4-rtn": {"quant": "int4", "algorithm": "rtn"},
    "int4-kquant": {"quant": "int4", "algorithm": "k_quant"},
    "int4-kquant-head8": {"quant": "int4", "algorithm": "k_quant",
                          "mixed_precision": ["last_matmul"]},
    "int4-kquant-mixed8": {"quant": "int4", "algorithm": "k_quant",
                           "mixed_precision": ["last_matmul", "mixed_layers"]},
    "int4-gptq": {"quant": "int4", "algorithm": "gptq"},
    "int4-gptq-head8": {"quant": "int4", "algorithm": "gptq", "mixed_precision": ["last_matmul"]},
}


def memory_bandwidth_gbs(repeats: int = 7) -> float:
    """Bytes per second of an fp32 matrix-vector product over a 256 MB matrix (median)."""
    w = np.random.default_rng(0).standard_normal((8192, 8192), dtype=np.float32)
    x = np.ones(8192, dtype=np.float32)
    w @ x
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        w @ x
        times.append(time.perf_counter() - start)
    return w.nbytes / statistics.median(times) / 1e9


def machine_facts() -> dict[str, Any]:
    """The CPU and libraries the figures belong to: onnxruntime picks its quantized kernels by
    instruction set (AVX2 vs AVX-512 VNNI changes int8/int4 decode speed severalfold)."""
    import os

    import onnxruntime
    import torch

    model, isa = cpu()
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa,
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


TABLE = {"method": "{}", "variant": "{}", "size_mb": "{:.0f}", "prefill-ms": "{:.0f}",
         "decode-tokens-per-s": "{:.1f}", "decode_x_pytorch": "{:.2f}x",
         "in_place_gain": "{:.2f}x", "perplexity": "{:.3f}", "ppl_vs_pytorch": "{:+.1%}",
         "top1": "{:.3f}", "category": "{:.3f}", "desc_f1": "{:.3f}", "bound_fraction": "{:.2f}"}
"""The printed table's columns and their formats (``report.py`` uses the same)."""


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", nargs="+",
                        default=[str(ROOT / "runs/hospitals-3/rounds/round-003")],
                        help="one or more adapters (of any method): each gets its own PyTorch "
                             "row and variant rows")
    parser.add_argument("--backbone", help="backbone (default: the adapter's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--records", type=int, default=32, help="held-out records per site")
    parser.add_argument("--questions", type=int, default=16, help="questions per task per site")
    parser.add_argument("--repeats", type=int, default=3, help="speed measurements (median)")
    add_json_argument(parser, "edge.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from fed_llama.export.merge import read_settings

    adapters = [Path(a) for a in args.adapter]
    methods = {}
    for adapter in adapters:  # every refusal before any work
        if not (adapter / "adapter_config.json").is_file():
            raise SystemExit(f"edge.py: error: no adapter in {adapter}: run the README's main "
                             "job first (it writes runs/hospitals-3) or pass --adapter")
        methods[adapter] = method_label(read_settings(adapter))
    bandwidth, facts = memory_bandwidth_gbs(), machine_facts()
    rows, sources = [], {}
    for adapter in adapters:
        found, sources[str(adapter)] = measure(adapter, args.variants, args, bandwidth)
        if len(adapters) > 1:
            found = [{"method": methods[adapter], **r} for r in found]
        rows += found
    _print(rows, bandwidth, facts)
    one = len(adapters) == 1
    result = {("adapter" if one else "adapters"):
              str(adapters[0]) if one else [str(a) for a in adapters],
              "machine": facts, "sources": next(iter(sources.values())) if one else sources,
              "records_per_site": args.records,
              "questions_per_task_per_site": args.questions,
              "memory_bandwidth_gbs": round(bandwidth, 1), "rows": rows}
    write_results(args.json, result)
    print(f"written to {args.json}")


def method_label(settings: Any) -> str:
    """The method column: the adapter's method, V2 without prompts (it folds) by its recipe."""
    if settings.method == "llama-adapter-v2" and not settings.branches:
        return "v2-bias-scale-norm"
    return str(settings.method)


def measure(adapter: Path, names: list[str], args: argparse.Namespace, bandwidth: float
            ) -> tuple[list[dict[str, Any]], list[str]]:
    """PyTorch eager fp32 with ``adapter`` (merged, its branches kept) and every variant of
    ``names``, on the held-out records of the adapter's sites; the rows and the sites
    (verification sources) measured."""
    from fed_llama.config.export import ExportConfig
    from fed_llama.config.loader import build_config
    from fed_llama.data.tokenize import encode_all
    from fed_llama.evaluation.tasks import choose_questions, evaluate_tasks, score_answers
    from fed_llama.export.merge import merge_adapter, save_merged
    from fed_llama.export.pipeline import build_graph
    from fed_llama.export.runtime import OnnxCausalLM
    from fed_llama.export.verify import (
        Agreement,
        calibration_set,
        heldout_examples,
        onnx_answers,
        speed_onnx,
        speed_prompt,
        speed_torch,
        torch_logits,
        verification_sources,
    )

    merged = merge_adapter(adapter, args.backbone)
    verify = {"records": args.records, "questions": args.questions}
    probe = build_config(ExportConfig, {"verify": verify}, source="edge.py")
    sources = verification_sources(probe.verify, merged.adapter_manifest)
    system = merged.adapter_manifest.get("system_prompt")  # what the adapter was trained with
    data = {}
    for source in sources:
        examples = heldout_examples(source, probe.verify, system)
        items, _ = encode_all(merged.tokenizer, examples, probe.verify.max_length)
        questions = choose_questions(examples, args.questions, 0, ("desc2code", "code2desc"))
        data[source] = (items, questions)
    all_items = [i for items, _ in data.values() for i in items]
    prompt = speed_prompt(all_items, 256)
    reference = {s: [torch_logits(merged.model, i.input_ids) for i in items]
                 for s, (items, _) in data.items()}

    def task_scores(answer_fn: Any) -> dict[str, float]:
        cat, f1 = [], []
        for _, questions in data.values():
            m = answer_fn(questions).metrics
            if "desc2code" in m:  # a task can have no question among few held-out records
                cat.append(m["desc2code"]["category"])
            if "code2desc" in m:
                f1.append(m["code2desc"]["f1"])
        return {"category": round(statistics.fmean(cat), 3) if cat else math.nan,
                "desc_f1": round(statistics.fmean(f1), 3) if f1 else math.nan}

    torch_bytes = sum(p.numel() * 4 for p in merged.model.parameters())
    pt_speed = medians([speed_torch(merged.model, prompt, 64) for _ in range(args.repeats)])
    rows: list[dict[str, Any]] = [{
        "variant": "pytorch-eager-fp32", "size_mb": round(torch_bytes / 1e6, 1),
        **{k: round(v, 1) for k, v in pt_speed.items()}, "decode_x_pytorch": 1.0,
        "perplexity": round(_pytorch_ppl(reference, data), 3), "top1": 1.0,
        **task_scores(lambda qs: evaluate_tasks(merged.model, merged.tokenizer, qs,
                                                max_questions=args.questions, max_new_tokens=24)),
        "bound_tokens_per_s": round(bandwidth * 1e9 / torch_bytes, 1)}]
    with tempfile.TemporaryDirectory(prefix="fed-llama-edge-") as tmp:
        hf_dir = save_merged(merged, Path(tmp) / "merged")
        for name in names:
            cfg = build_config(ExportConfig, {**VARIANTS[name], "verify": verify}, source=name)
            out = Path(tmp) / name
            started = time.monotonic()
            build_graph(merged, hf_dir, out, cfg, calibration_set(sources, cfg, system),
                        cache=Path(tmp) / "cache")
            build_s = time.monotonic() - started
            lm = OnnxCausalLM(out)
            agreement = Agreement()
            for source, (items, _) in data.items():
                for item, ref in zip(items, reference[source], strict=True):
                    agreement.add(item, ref, lm.sequence_logits(item.input_ids))
            s = agreement.summary()
            size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
            # PyTorch eager again beside every variant (this machine's speed drifts over a
            # run): the ratio is the median of ratios measured one right after the other
            paired = [(speed_onnx(lm, prompt, 64),
                       speed_onnx(lm, prompt, 64, array_cache=True),
                       speed_torch(merged.model, prompt, 64)) for _ in range(args.repeats)]
            speed = medians([o for o, _, _ in paired])
            rows.append({
                "variant": f"onnx-{name}", "size_mb": round(size / 1e6, 1),
                **{k: round(v, 1) for k, v in speed.items()},
                "decode_x_pytorch": round(statistics.median(
                    o["decode-tokens-per-s"] / t["decode-tokens-per-s"] for o, _, t in paired), 2),
                "in_place_gain": round(statistics.median(
                    o["decode-tokens-per-s"] / a["decode-tokens-per-s"] for o, a, _ in paired), 2),
                "pytorch_tokens_per_s": round(statistics.median(
                    t["decode-tokens-per-s"] for _, _, t in paired), 1),
                "perplexity": round(s["perplexity-onnx"], 3),
                "top1": round(s["top1-agreement"], 3),
                "max_logit_diff": round(s["max-logit-diff"], 5),
                **task_scores(lambda qs, lm=lm: score_answers(qs, onnx_answers(lm, qs, 24))),
                "bound_tokens_per_s": round(bandwidth * 1e9 / size, 1),
                "build_s": round(build_s, 1)})
            print(f"  {adapter.name} {name}: done", flush=True)
    base = rows[0]
    sizes = {r["variant"]: r["size_mb"] for r in rows}
    fp32_size = sizes.get("onnx-fp32", sizes.get("onnx-torch-fp32"))
    for r in rows:
        r["ppl_vs_pytorch"] = round(r["perplexity"] / base["perplexity"] - 1, 4)
        r["bound_fraction"] = round(r["decode-tokens-per-s"] / r["bound_tokens_per_s"], 2)
        if fp32_size:
            r["size_vs_onnx_fp32"] = round(r["size_mb"] / fp32_size, 3)
    return rows, sources


def _pytorch_ppl(reference: dict[str, list[np.ndarray]], data: dict[str, Any]) -> float:
    from fed_llama.export.verify import Agreement

    a = Agreement()
    for source, (items, _) in data.items():
        for item, ref in zip(items, reference[source], strict=True):
            a.add(item, ref, ref)
    return a.summary()["perplexity-pytorch"]


def _print(rows: list[dict[str, Any]], bandwidth: float, facts: dict[str, Any]) -> None:
    print(f"{facts['cpu']}, {facts['cores']} cores, {' '.join(facts['isa']) or 'no AVX2'}; "
          f"onnxruntime {facts['onnxruntime']}, torch {facts['torch']}")
    print(f"memory bandwidth {bandwidth:.1f} GB/s (fp32 matrix-vector)")
    print(markdown_table(rows, [c for c in TABLE if any(c in r for r in rows)], TABLE))


if __name__ == "__main__":
    main()
