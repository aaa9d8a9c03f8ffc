"""Training throughput of fed-llama against a minimal hand-written peft + torch loop.

Both train the same LoRA (r=8 on q,k,v,o) on the same ICD-10 site data with the same batch
size and optimizer, on the default backbone; each measurement runs in a fresh process (so
peak RSS is its own). Throughput counts real (non-padding) tokens per second over the timed
steps, after warm-up steps. Also reports peak RSS of LoRA vs QLoRA (NF4 backbone).

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

from harness import add_json_argument, markdown_table, write_results

WARMUP = 3


def worker(mode: str, steps: int, batch_size: int, site: str) -> dict[str, object]:
    """One measurement: mode is fed-llama, baseline or fed-llama-qlora."""
    import torch

    from fed_llama.backbone import load_backbone
    from fed_llama.config import BackboneConfig, DataConfig, LoraConfig, OptimConfig
    from fed_llama.data.batching import collate
    from fed_llama.data.source import load_site_data
    from fed_llama.training.loop import train_adapter
    from fed_llama.training.lora import attach_lora, peft_config

    bb = load_backbone(BackboneConfig(quantization="nf4" if mode.endswith("qlora") else "none"))
    data = load_site_data(DataConfig(source=f"icd10:{site}"), bb.tokenizer, seed=0)
    pad = bb.tokenizer.pad_token_id
    if mode.startswith("fed-llama"):
        model = attach_lora(bb.model, LoraConfig(), seed=0)
        cfg = OptimConfig(max_steps=WARMUP, batch_size=batch_size, warmup_steps=0)
        train_adapter(model, data.train, cfg, pad, progress=False)  # warm-up, not timed
        stats = train_adapter(model, data.train, OptimConfig(
            max_steps=steps, batch_size=batch_size, warmup_steps=0, seed=1), pad,
            progress=False)
        tokens, seconds = stats.tokens, stats.seconds
    else:  # the minimal loop a user would write by hand with peft
        from peft import get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(bb.model, peft_config(LoraConfig()))
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        rng = random.Random(0)
        tokens, seconds = 0, 0.0
        for step in range(WARMUP + steps):
            batch = collate(rng.sample(data.train, batch_size), pad)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optim.step()
            optim.zero_grad()
            if step >= WARMUP:
                seconds += time.perf_counter() - start
                tokens += int(batch["attention_mask"].sum())
    return {"mode": mode, "steps": steps, "batch_size": batch_size, "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--site", default="cardiology")
    add_json_argument(parser, "train_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch_size, args.site)))
        return
    rows = []
    for mode in ("baseline", "fed-llama", "fed-llama-qlora"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps",
                              str(args.steps), "--batch-size", str(args.batch_size), "--site",
                              args.site], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_to_baseline"] = round(row["tokens_per_s"] / base, 2)
    print(f"{args.steps} timed steps of {args.batch_size} examples, site {args.site}")
    cols = ["mode", "tokens_per_s", "ratio_to_baseline", "peak_rss_mb", "seconds", "tokens"]
    print(markdown_table(rows, cols))
    write_results(args.json, {"rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
