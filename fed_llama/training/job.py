"""A site's local training run, end to end: ``fed-llama train``."""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fed_llama.adapter.store import check_output_dir
from fed_llama.backbone.load import load_backbone
from fed_llama.config.adapter import method_label
from fed_llama.config.train import TrainConfig
from fed_llama.data.source import load_site_data
from fed_llama.training.loop import train_adapter
from fed_llama.training.lora import trainable_parameters
from fed_llama.training.loss import heldout_loss
from fed_llama.training.method import attach_method, save_method

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def method_name(cfg: TrainConfig) -> str:
    """``qlora`` for LoRA on an NF4 backbone, else the adapter method's name."""
    return method_label(cfg.method, cfg.backbone.quantization)


def run_training(cfg: TrainConfig, out: Path, *, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Train an adapter as ``cfg`` says, save it to ``out`` and return the metrics."""
    check_output_dir(out, force)  # before minutes of work, not after
    started = time.perf_counter()
    backbone = load_backbone(cfg.backbone)
    tok = backbone.tokenizer
    data = load_site_data(cfg.data, tok, cfg.train.seed)
    log.info("data: %d training and %d held-out examples (%s)", len(data.train),
             len(data.heldout), cfg.data.source)
    model = attach_method(backbone.model, cfg, cfg.train.seed)
    bs, pad = cfg.train.eval_batch_size, tok.pad_token_id
    before = heldout_loss(model, data.heldout, bs, pad)  # at init every method is a no-op
    log.info("held-out before training: loss %.4f, perplexity %.2f", before.loss, before.perplexity)
    stats = train_adapter(model, data.train, cfg.train, pad, progress=progress)
    after = heldout_loss(model, data.heldout, bs, pad)
    log.info("held-out after training: loss %.4f, perplexity %.2f (%d steps, %.0f tokens/s)",
             after.loss, after.perplexity, stats.steps, stats.tokens_per_second)
    metrics = {
        "heldout_before": before.as_dict(),
        "heldout_after": after.as_dict(),
        "perplexity_reduction": 1 - after.perplexity / before.perplexity,
        "train": stats.as_dict(),
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(model)),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    manifest = {
        "kind": "adapter",
        "method": method_name(cfg),
        "backbone": backbone.describe(),
        "adapter": {"method": cfg.method, "settings": cfg.method_settings()},
        "optim": dataclasses.asdict(cfg.train),
        "data": data.summary,
        "system_prompt": cfg.data.trained_system_prompt,
        "metrics": metrics,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if cfg.method == "lora":
        manifest["lora"] = (dataclasses.asdict(cfg.lora)
                            | {"target_modules": list(cfg.lora.modules())})
    save_method(model, cfg, out, manifest, base=str(backbone.source.model_dir), force=force)
    log.info("adapter saved to %s", out)
    return metrics
