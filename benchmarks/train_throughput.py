"""Training throughput of fed-llama against a minimal hand-written peft + torch loop.

Both train the same LoRA (r=8 on q,k,v,o) on the same ICD-10 site data with the same batch
size and optimizer, on the default backbone; each measurement runs in a fresh process (so
peak RSS is its own). Throughput counts real (non-padding) tokens per second over the timed
steps, after warm-up steps. fed-llama runs as LoRA on the fp32 backbone, on the bf16 backbone,
with activation checkpointing, and as QLoRA (NF4 backbone, fp32 or bf16 compute, without and
with activation checkpointing).

Where the memory goes (fed-llama rows), from the model itself rather than estimated:
``weights_mb`` (every parameter and buffer as stored: NF4 packed, bf16 or fp32),
``adapter_state_mb`` (the trainable parameters' gradients and AdamW's two moments),
``activations_mb`` (the bytes autograd saves for backward in one step on a batch of
median-length training examples, parameters excluded, each storage counted once; and
``activations_longest_mb`` on the longest ones, the worst step), their sum
(``accounted_mb``; ``accounted_longest_mb`` with the longest batch's activations), the
process's resident memory before the backbone loads (``runtime_mb``: Python, torch and the
libraries), the peak while loading it (``load_peak_mb``) and after (``after_load_mb``), and
``peak_x_accounted`` (``peak_x_accounted_longest``), the training's peak RSS over the sum.

    python benchmarks/train_throughput.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import add_json_argument, markdown_table, write_results

WARMUP = 3
"""Untimed steps before the timed ones (``--warmup``)."""


MODES = ("baseline", "fed-llama", "fed-llama-bf16", "fed-llama-ckpt", "fed-llama-qlora",
         "fed-llama-qlora-ckpt", "fed-llama-qlora-bf16", "fed-llama-qlora-bf16-ckpt")
"""The hand-written loop, then fed-llama's LoRA on the fp32 backbone, on the bf16 backbone, with
activation checkpointing, and QLoRA (fp32 and bf16 compute) without and with it."""


def rss_mb() -> float:
    """This process's resident memory now (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_breakdown(model: object, batch: dict[str, object]) -> dict[str, float]:
    """Weights, adapter state (gradients and AdamW moments) and one step's saved activations
    of ``model`` on ``batch``, in MB (see the module's docstring)."""
    import torch

    from fed_llama.training.loss import answer_nll

    params = list(model.parameters())  # type: ignore[attr-defined]
    tensors = params + list(model.buffers())  # type: ignore[attr-defined]
    weights = sum(t.untyped_storage().nbytes() for t in
                  {t.untyped_storage().data_ptr(): t for t in tensors}.values())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    held = {p.untyped_storage().data_ptr() for p in tensors}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()  # type: ignore[attr-defined]  # (checkpointing applies in training only)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, n = answer_nll(model, batch)
    (nll / max(n, 1)).backward()
    model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
    mb = {"weights_mb": weights / 2**20, "adapter_state_mb": 3 * trainable / 2**20,
          "activations_mb": sum(saved.values()) / 2**20}
    mb["accounted_mb"] = sum(mb.values())
    return {k: round(v, 1) for k, v in mb.items()}


def worker(mode: str, steps: int, batch_size: int, site: str, backbone: str = "smollm2-135m",
           warmup: int = WARMUP) -> dict[str, object]:
    """One measurement, for a mode of :data:`MODES`, on ``backbone`` (a built-in name or a
    Hugging Face LLaMA folder, as ``[backbone] name``)."""
    import torch

    from fed_llama.backbone import load_backbone
    from fed_llama.config import BackboneConfig, DataConfig, LoraConfig, OptimConfig
    from fed_llama.data.batching import collate
    from fed_llama.data.source import load_site_data
    from fed_llama.training.loop import train_adapter
    from fed_llama.training.lora import attach_lora, peft_config

    runtime = rss_mb()
    bb = load_backbone(BackboneConfig(
        name=backbone, quantization="nf4" if "qlora" in mode else "none",
        precision="bf16" if "bf16" in mode else "fp32"))
    loaded = {"load_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "after_load_mb": round(rss_mb(), 1)}
    data = load_site_data(DataConfig(source=f"icd10:{site}"), bb.tokenizer, seed=0)
    pad = bb.tokenizer.pad_token_id
    extra: dict[str, object] = {}
    if mode.startswith("fed-llama"):
        model = attach_lora(bb.model, LoraConfig(), seed=0)
        ckpt = "ckpt" in mode
        cfg = OptimConfig(max_steps=warmup, batch_size=batch_size, warmup_steps=0,
                          activation_checkpointing=ckpt)
        train_adapter(model, data.train, cfg, pad, progress=False)  # warm-up, not timed
        stats = train_adapter(model, data.train, OptimConfig(
            max_steps=steps, batch_size=batch_size, warmup_steps=0, seed=1,
            activation_checkpointing=ckpt), pad, progress=False)
        tokens, seconds = stats.tokens, stats.seconds
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training's own
        by_length = sorted(data.train, key=lambda e: len(e.input_ids))
        middle = len(by_length) // 2 - batch_size // 2
        typical = by_length[max(middle, 0):max(middle, 0) + batch_size]
        longest = memory_breakdown(model, collate(by_length[-batch_size:], pad))
        extra = {**memory_breakdown(model, collate(typical, pad)),
                 "activations_longest_mb": longest["activations_mb"],
                 "runtime_mb": round(runtime, 1), **loaded}
    else:  # the minimal loop a user would write by hand with peft
        from peft import get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(bb.model, peft_config(LoraConfig()))
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        rng = random.Random(0)
        tokens, seconds = 0, 0.0
        for step in range(warmup + steps):
            batch = collate(rng.sample(data.train, batch_size), pad)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optim.step()
            optim.zero_grad()
            if step >= warmup:
                seconds += time.perf_counter() - start
                tokens += int(batch["attention_mask"].sum())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if "accounted_mb" in extra:
        extra["peak_x_accounted"] = round(peak / float(extra["accounted_mb"]), 2)  # type: ignore[arg-type]
        longest_sum = (float(extra["accounted_mb"]) - float(extra["activations_mb"])  # type: ignore[arg-type]
                       + float(extra["activations_longest_mb"]))  # type: ignore[arg-type]
        extra["accounted_longest_mb"] = round(longest_sum, 1)
        extra["peak_x_accounted_longest"] = round(peak / longest_sum, 2)
    return {"mode": mode, "steps": steps, "batch_size": batch_size, "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "peak_rss_mb": round(peak, 1), **extra}


def run_worker(mode: str, steps: int, batch_size: int, site: str,
               backbone: str = "smollm2-135m", warmup: int = WARMUP) -> dict[str, Any]:
    """:func:`worker` in a fresh process of its own (so its peak RSS is its own): its row."""
    done = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--steps", str(steps), "--batch-size",
         str(batch_size), "--site", site, "--backbone", backbone, "--warmup", str(warmup)],
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{Path(__file__).name}: {mode} on {backbone} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--site", default="cardiology")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="the modes to run (ratios need baseline and fed-llama among them)")
    add_json_argument(parser, "train_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="smollm2-135m", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=WARMUP, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch_size, args.site,
                                args.backbone, args.warmup)))
        return
    rows = [run_worker(mode, args.steps, args.batch_size, args.site) for mode in args.modes]
    base = next((r["tokens_per_s"] for r in rows if r["mode"] == "baseline"), None)
    lora = next((r for r in rows if r["mode"] == "fed-llama"), None)
    for row in rows:
        if base:
            row["ratio_to_baseline"] = round(row["tokens_per_s"] / base, 2)
        if lora and row["mode"].startswith("fed-llama"):  # the site-cost issue's ratios
            row["rss_x_lora_fp32"] = round(row["peak_rss_mb"] / lora["peak_rss_mb"], 2)
            row["speed_x_lora_fp32"] = round(row["tokens_per_s"] / lora["tokens_per_s"], 2)
    print(f"{args.steps} timed steps of {args.batch_size} examples, site {args.site}")
    cols = ["mode", "tokens_per_s", "ratio_to_baseline", "peak_rss_mb", "rss_x_lora_fp32",
            "speed_x_lora_fp32", "weights_mb", "adapter_state_mb", "activations_mb",
            "activations_longest_mb", "accounted_mb", "accounted_longest_mb", "runtime_mb",
            "load_peak_mb", "after_load_mb", "peak_x_accounted", "peak_x_accounted_longest",
            "seconds", "tokens"]
    print(markdown_table(rows, cols))
    write_results(args.json, {"rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
