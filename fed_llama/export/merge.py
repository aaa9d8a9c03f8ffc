"""Merge a LoRA/QLoRA adapter into its backbone: ``W' = W + (alpha/r)·B·A`` for every adapted
layer, written as a plain Hugging Face model folder; or fold a LLaMA-Adapter V2 adapter's
biases, scales and norms into a LlamaForCausalLM with biases. What does not fold (V1 and V2
prompts, the Excitor's key branch) stays in the PyTorch model as a branch, for the plain
``torch.onnx`` route to trace (:mod:`fed_llama.export.plain`).

A QLoRA adapter was trained against the NF4-quantized backbone, so it is merged into the
dequantized NF4 weights (what its forward pass saw), not into the original full-precision
weights; the export manifest records which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_llama.adapter.methods.own_format import OwnAdapterConfig, parse_config
from fed_llama.adapter.store import load_adapter, read_manifest
from fed_llama.backbone.load import Backbone
from fed_llama.common.bounded_json import BadJson, loads
from fed_llama.errors import AdapterError, ConfigError
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
    branches: str = ""
    """What of the adapter stays a branch of the model, not folded ('' : nothing)."""


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


SWITCHABLE = ("lora", "llama-adapter", "excitor")
"""Methods whose adapters switch at run time in a ``runtime_adapters`` export."""


@dataclass(frozen=True)
class AdapterSettings:
    """An adapter folder's ``adapter_config.json``, read once and passed on."""

    method: str
    """The method it was trained with (see :mod:`fed_llama.adapter.methods`)."""
    saved: OwnAdapterConfig | None
    """A fed-llama method's saved settings; None for a peft adapter."""

    @property
    def prompts(self) -> bool:
        return self.saved is not None and bool(self.saved.config.get("prompts"))

    @property
    def branches(self) -> str:
        """What of the adapter does not fold into the backbone ('' when all of it does)."""
        if self.method == "excitor":
            return "an extra-key branch"
        if self.method == "llama-adapter" or (self.method == "llama-adapter-v2"
                                              and self.prompts):
            return "gated adaption prompts"
        return ""


def read_settings(adapter: Path) -> AdapterSettings:
    """Read ``adapter/adapter_config.json``: the method and, for ours, the saved settings."""
    path = adapter / "adapter_config.json"
    try:
        data = loads(path.read_bytes(), max_bytes=1 << 20)
    except (OSError, BadJson) as exc:
        raise AdapterError(f"{path} cannot be read ({exc}): copy the adapter again") from None
    saved = parse_config(data, path)
    if saved is not None:
        return AdapterSettings(saved.method, saved)
    peft_type = data.get("peft_type") if isinstance(data, dict) else None
    return AdapterSettings("llama-adapter" if peft_type == "ADAPTION_PROMPT" else "lora", None)


def check_foldable(adapter: Path, *, runtime_adapters: bool = False,
                   settings: AdapterSettings | None = None) -> AdapterSettings:
    """Refuse, before any work, an adapter that cannot be exported so; return its settings
    (read here unless given) for :func:`fold_adapter`.

    LoRA merges (``W + scale·B·A``); LLaMA-Adapter V2 folds its biases, scales and norms
    (``W' = diag(s)·W``, ``b' = s ⊙ (b₀ + b)``). Prompts (V1, V2) and the Excitor's key
    branch do not fold: they stay as branches of the PyTorch model, which the plain
    ``torch.onnx`` route traces and which are grafted onto the builder's graph
    (:mod:`fed_llama.export.graft`). Runtime-switchable adapters are LoRA's, V1's and the
    Excitor's (:mod:`fed_llama.export.switchable`); V2's biases and scales are folded into the
    projection weights, which cannot switch.
    """
    settings = settings if settings is not None else read_settings(adapter)
    method = settings.method
    if runtime_adapters and method not in SWITCHABLE:
        raise ConfigError(f"adapter {str(adapter)!r} is a {method} adapter: runtime_adapters "
                          "switches lora, llama-adapter and excitor adapters (V2 folds its "
                          "biases and scales into the backbone's weights, which differ per "
                          "site); set runtime_adapters = false")
    return settings


def fold_adapter(base: MergedModel, adapter: Path,
                 settings: AdapterSettings | None = None) -> MergedModel:
    """Fold ``adapter`` into ``base``'s weights (in place). What cannot fold (prompts, the
    Excitor's key branch) stays as the model's branches (``base.branches`` names them).
    ``settings``: what :func:`check_foldable` returned (its config is not read again)."""
    settings = settings if settings is not None else read_settings(adapter)
    base.branches = settings.branches
    if settings.method in ("llama-adapter-v2", "excitor"):
        from fed_llama.adapter.methods.llama_adapter_v2.model import fold
        from fed_llama.adapter.methods.own_format import load_into, saved_settings

        trained_on = base.adapter_manifest.get("backbone", {}).get("sha256")
        if trained_on and trained_on != base.backbone.source.sha256:
            raise AdapterError(f"adapter {str(adapter)!r} was trained on another backbone "
                               f"(sha256 {trained_on[:12]}...): export it with that backbone")
        spec, cfg = saved_settings(adapter, settings.saved)
        model = load_into(base.model, adapter, settings=(spec, cfg))
        base.model = (fold(model, cfg) if settings.method == "llama-adapter-v2"
                      else model).eval()
        return base
    model = load_adapter(base.model, adapter, backbone_sha256=base.backbone.source.sha256)
    base.model = (model.merge_and_unload() if settings.method == "lora" else model).eval()
    return base


def merge_adapter(adapter: Path | None, backbone: str | None = None,
                  settings: AdapterSettings | None = None) -> MergedModel:
    """Load ``backbone`` (default: the adapter's own) and fold ``adapter`` into it
    (``settings``: as :func:`fold_adapter`).

    ``adapter`` None exports the backbone alone. The result has no LoRA layers left, so it
    cannot be merged twice; it keeps the branches that do not fold (see :func:`fold_adapter`).
    """
    base = load_base(adapter, backbone)
    return fold_adapter(base, adapter, settings) if adapter is not None else base


def save_merged(merged: MergedModel, out: Path) -> Path:
    """Write the merged model as a Hugging Face folder (safetensors, config, tokenizer); of a
    model with branches (which no Hugging Face class loads) the backbone part, what the
    builder reads (the branches are grafted onto its graph, :mod:`fed_llama.export.graft`;
    the plain route copies the config and tokenizer only)."""
    out.mkdir(parents=True, exist_ok=True)
    if merged.branches:
        _save_backbone_part(merged.model, out)
    else:
        merged.model.save_pretrained(str(out), safe_serialization=True)
    merged.tokenizer.save_pretrained(str(out))
    return out


def _save_backbone_part(model: Any, out: Path) -> None:
    """Write the ``LlamaForCausalLM`` weights of ``model`` (with branches) to ``out``: every
    tensor a plain LlamaForCausalLM of its config has, under that name (peft's LLaMA-Adapter
    wraps each attention as ``self_attn.model``), and nothing else."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        wanted = set(LlamaForCausalLM(base.config).state_dict())
    if base.config.tie_word_embeddings:
        wanted.discard("lm_head.weight")  # one tensor, saved once under the embedding's name
    state = {}
    for key, value in base.state_dict().items():
        key = key.replace(".self_attn.model.", ".self_attn.")
        if key in wanted:
            state[key] = value.detach().float().contiguous()
    if wanted - set(state):
        raise AdapterError(f"the merged model lacks {sorted(wanted - set(state))[:3]} of a "
                           "LlamaForCausalLM: its backbone cannot be written for the builder")
    base.config.save_pretrained(str(out))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
