"""How a site's training cost grows with the model: LoRA and QLoRA on larger LLaMA shapes.

Speed and memory only: the larger backbones are random-initialized LLaMA models of about 0.5B
and 1.1B parameters (the second has TinyLlama-1.1B's shape: 22 layers, hidden 2048, MLP 5632,
32 query and 4 key-value heads), built here with the default backbone's tokenizer (so its
49,152-token vocabulary, untied embeddings) and saved once as Hugging Face folders under
``--work``; nothing is downloaded. The default backbone (its real weights) is the smallest
point. Every row is one ``train_throughput.py`` worker in a fresh process (peak RSS is its
own), on the same ICD-10 site data and batch size, with the same memory breakdown.

From each mode's rows, a straight line through peak RSS against parameter count (least
squares) gives the largest LLaMA whose training that mode fits in ``--memory-gib`` (24 GiB,
this machine's): an extrapolation, printed with the fit, not a measurement.

The run is resumable: each row is written to the JSON as it finishes, and a rerun with the same
settings measures only the rows that are missing.

    python benchmarks/site_scale.py --work work/scale
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from harness import add_json_argument, markdown_table, write_results
from train_throughput import run_worker

SHAPES: dict[str, dict[str, int] | None] = {
    "smollm2-135m": None,  # the default backbone itself
    "llama-0.5b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16,
                   "num_attention_heads": 12, "num_key_value_heads": 4},
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632,
                       "num_hidden_layers": 22, "num_attention_heads": 32,
                       "num_key_value_heads": 4},
}
"""The model sizes measured: the default backbone, then random LLaMA shapes."""
MODES = ("fed-llama", "fed-llama-qlora", "fed-llama-qlora-ckpt")
"""LoRA on the fp32 backbone, QLoRA, and QLoRA with activation checkpointing."""
SETTINGS = ("steps", "warmup", "batch_size", "site")
"""The settings a stored row must share with this run to be kept."""


def build_backbone(shape: str, work: Path) -> tuple[str, int]:
    """The backbone name for ``shape`` (a folder under ``work``, built once) and its parameter
    count."""
    spec = SHAPES[shape]
    if spec is None:
        from fed_llama.backbone import load_backbone
        from fed_llama.config import BackboneConfig

        model = load_backbone(BackboneConfig()).model
        return "smollm2-135m", sum(p.numel() for p in model.parameters())
    folder = work / shape
    info = folder / "shape.json"
    if info.is_file():
        return str(folder), int(json.loads(info.read_text())["parameters"])
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fed_llama.backbone.load import load_tokenizer, resolve_backbone

    tokenizer = load_tokenizer(resolve_backbone("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **spec)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "shape.json").write_text(json.dumps({"parameters": count, **spec}))
    partial.rename(folder)  # a folder with shape.json is complete
    return str(folder), count


def fit(rows: list[dict[str, Any]], memory_mb: float) -> dict[str, float] | None:
    """Least-squares line of peak RSS (MB) against parameters (billions) and where it reaches
    ``memory_mb``; None with fewer than two sizes."""
    pts = [(r["parameters"] / 1e9, r["peak_rss_mb"]) for r in rows]
    if len({x for x, _ in pts}) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    slope = (sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts))
    icept = my - slope * mx
    return {"mb_per_billion": round(slope, 1), "intercept_mb": round(icept, 1),
            "largest_fitting_b": round((memory_mb - icept) / slope, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="work/scale",
                        help="where the random backbones are saved (several GB)")
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--site", default="cardiology")
    parser.add_argument("--memory-gib", type=float, default=24.0)
    add_json_argument(parser, "site_scale.json")
    args = parser.parse_args()
    out = Path(args.json)
    settings = {k: getattr(args, k) for k in SETTINGS}
    rows: list[dict[str, Any]] = []
    if out.is_file():
        try:
            stored = json.loads(out.read_text())
        except ValueError:
            stored = {}
        if stored.get("settings") == settings:
            rows = list(stored.get("rows", []))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        if all(any(r["size"] == size and r["mode"] == m for r in rows) for m in args.modes):
            continue
        backbone, count = build_backbone(size, work)
        for mode in args.modes:
            if any(r["size"] == size and r["mode"] == mode for r in rows):
                continue
            print(f"{size} {mode} ...", flush=True)
            row = {"size": size, "parameters": count, **run_worker(
                mode, args.steps, args.batch_size, args.site, backbone, args.warmup)}
            rows.append(row)
            write_results(out, {"settings": settings, "rows": rows})
    fits = {}
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        line = fit(mine, args.memory_gib * 1024)
        if line:
            fits[mode] = line
    lora = {r["size"]: r for r in rows if r["mode"] == "fed-llama"}
    for row in rows:
        base = lora.get(row["size"])
        if base:
            row["rss_x_lora_fp32"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 2)
            row["speed_x_lora_fp32"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
    order = {s: i for i, s in enumerate(SHAPES)}
    rows.sort(key=lambda r: (order[str(r["size"])], MODES.index(str(r["mode"]))))
    print(f"{args.steps} timed steps of {args.batch_size} examples after {args.warmup} "
          f"warm-up, site {args.site}")
    print(markdown_table(rows, ["size", "parameters", "mode", "tokens_per_s", "peak_rss_mb",
                                "rss_x_lora_fp32", "speed_x_lora_fp32", "weights_mb",
                                "activations_mb", "activations_longest_mb", "accounted_mb"]))
    fit_rows = [{"mode": m, **f} for m, f in fits.items()]
    print(markdown_table(fit_rows, ["mode", "mb_per_billion", "intercept_mb",
                                    "largest_fitting_b"]))
    write_results(out, {"settings": settings, "rows": rows, "fits": fit_rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
