"""Merge a LoRA/QLoRA adapter into its backbone: ``W' = W + (alpha/r)·B·A`` for every adapted
layer, written as a plain Hugging Face model folder.

A QLoRA adapter was trained against the NF4-quantized backbone, so it is merged into the
dequantized NF4 weights (what its forward pass saw), not into the original full-precision
weights; the export manifest records which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_llama.adapter.store import load_adapter, read_manifest
from fed_llama.backbone.load import Backbone
from fed_llama.inference.model import load_model

log = logging.getLogger(__name__)


@dataclass
class MergedModel:
    """A backbone with the adapter folded into its weights (no peft wrapper left)."""

    model: Any
    tokenizer: Any
    backbone: Backbone
    merged_into: str
    """``fp32`` (the backbone's own weights) or ``dequantized-nf4`` (QLoRA)."""
    adapter_manifest: dict[str, Any]


def load_base(adapter: Path | None, backbone: str | None = None) -> MergedModel:
    """The weights ``adapter`` was trained against, in fp32, without the adapter.

    For a QLoRA adapter that is the dequantized NF4 backbone; otherwise the backbone itself.
    """
    manifest = read_manifest(adapter) if adapter else {}
    qlora = manifest.get("backbone", {}).get("quantization") == "nf4"
    name = backbone or manifest.get("backbone", {}).get("id")
    loaded = load_model(name, None, quantization="nf4" if qlora else "none")
    model = loaded.model
    if qlora:
        log.info("QLoRA adapter: merging into the dequantized NF4 weights it was trained on")
        model = model.dequantize()
    model = model.float().eval()
    return MergedModel(model=model, tokenizer=loaded.backbone.tokenizer,
                       backbone=loaded.backbone,
                       merged_into="dequantized-nf4" if qlora else "fp32",
                       adapter_manifest=manifest)


def fold_adapter(base: MergedModel, adapter: Path) -> MergedModel:
    """Fold ``adapter`` into ``base``'s weights (in place): no LoRA layers are left."""
    model = load_adapter(base.model, adapter, backbone_sha256=base.backbone.source.sha256)
    base.model = model.merge_and_unload().eval()
    return base


def merge_adapter(adapter: Path | None, backbone: str | None = None) -> MergedModel:
    """Load ``backbone`` (default: the adapter's own) and fold ``adapter`` into it.

    ``adapter`` None exports the backbone alone. The result has no LoRA layers left, so it
    cannot be merged twice.
    """
    base = load_base(adapter, backbone)
    return fold_adapter(base, adapter) if adapter is not None else base


def save_merged(merged: MergedModel, out: Path) -> Path:
    """Write the merged model as a Hugging Face folder (safetensors, config, tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    merged.model.save_pretrained(str(out), safe_serialization=True)
    merged.tokenizer.save_pretrained(str(out))
    return out
