"""Load a backbone with an optional trained adapter, for evaluation and generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_llama.adapter.store import load_adapter, read_manifest
from fed_llama.backbone.load import Backbone, load_backbone
from fed_llama.config.loader import build_config
from fed_llama.config.train import BackboneConfig


@dataclass
class LoadedModel:
    """A model ready for inference: the backbone, with the adapter applied if one was given."""

    model: Any
    backbone: Backbone
    adapter: Path | None
    system_prompt: str | None = None
    """The system message the adapter was trained with (None: the chat template's default)."""


def load_model(backbone: str | None, adapter: Path | None,
               quantization: str | None = None) -> LoadedModel:
    """Load ``backbone`` (default: the adapter's own, else smollm2-135m) plus ``adapter``.

    With an adapter and no explicit ``quantization``, the backbone is loaded the way the
    adapter was trained (NF4 for a QLoRA adapter).
    """
    manifest = read_manifest(adapter) if adapter else {}
    trained = manifest.get("backbone", {})
    name = backbone or trained.get("id") or BackboneConfig.name
    settings = {"name": name, "quantization": quantization or trained.get("quantization", "none"),
                "precision": trained.get("precision", "fp32")}
    where = f"backbone settings for adapter {adapter}" if adapter else "backbone settings"
    loaded = load_backbone(build_config(BackboneConfig, settings, source=where))
    model = loaded.model
    if adapter is not None:
        model = load_adapter(model, adapter, backbone_sha256=loaded.source.sha256)
        model.eval()
    return LoadedModel(model=model, backbone=loaded, adapter=adapter,
                       system_prompt=manifest.get("system_prompt"))
