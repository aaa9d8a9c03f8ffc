"""The chosen adapter method on a frozen backbone: attach it, read and load its state, save it.

Everything downstream (site training, the aggregator's initial adapter and checkpoints,
``fed-llama train``) goes through these functions and works from the state a method declares:
its trainable tensors by saved name.

==================  ==================================  ==================================
method              state (names -> tensors)            saved as
==================  ==================================  ==================================
``lora`` (QLoRA)    peft's state dict (``lora_A/B``)    peft folder
``llama-adapter``   peft's state dict (``adaption_*``)  peft folder (plain
                                                        ``PeftModel.from_pretrained``)
``llama-adapter-v2`` trainable parameters by name       own format (``own_format.load_into``)
``excitor``         trainable parameters by name        own format (``own_format.load_into``)
==================  ==================================  ==================================
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fed_llama.adapter.methods import method_of, own_format
from fed_llama.adapter.state import State
from fed_llama.common.notices import without_checkpointing_notice
from fed_llama.config.adapter import MethodSections
from fed_llama.training import lora


def peft_saved(method: str) -> bool:
    """Whether the method's state and folder are peft's (LoRA, V1) rather than ours."""
    return method in ("lora", "llama-adapter")


def attach_method(model: Any, sections: MethodSections, seed: int) -> Any:
    """``model`` (frozen) with the chosen method's freshly initialized, seeded parameters."""
    if sections.method == "lora":
        return lora.attach_lora(model, sections.lora, seed)
    with without_checkpointing_notice():
        return method_of(sections.method).attach(model, sections.method_config(), seed)


def method_state(model: Any, method: str) -> State:
    """The method's trainable tensors by saved name, as CPU copies."""
    if peft_saved(method):
        return lora.adapter_state(model)
    return own_format.trainable_state(model)


def load_method_state(model: Any, method: str, state: State) -> None:
    """Load a state of :func:`method_state` into ``model`` (names and shapes must fit)."""
    if peft_saved(method):
        lora.load_adapter_state(model, state)
    else:
        own_format.load_trainable_state(model, state)


def adapter_config(sections: MethodSections, model_dir: Path) -> Any:
    """What ``adapter_config.json`` of the method's folder holds (an object with
    ``save_pretrained``), for the backbone in the Hugging Face folder ``model_dir``."""
    base = str(model_dir)
    if sections.method == "lora":
        cfg = lora.peft_config(sections.lora)
    elif sections.method == "llama-adapter":  # peft's config names the adapted layers
        from transformers import AutoConfig

        from fed_llama.adapter.methods.llama_adapter.model import peft_config

        layers = int(AutoConfig.from_pretrained(base).num_hidden_layers)
        cfg = peft_config(sections.llama_adapter, layers)
    else:
        return own_format.OwnAdapterConfig(sections.method,
                                           dataclasses.asdict(sections.method_config()), base)
    cfg.base_model_name_or_path = base
    return cfg


def save_method(model: Any, sections: MethodSections, out: Path, manifest: dict[str, Any], *,
                base: str = "", force: bool = False) -> Path:
    """Write the trained adapter of ``model`` to ``out`` in its method's format."""
    from fed_llama.adapter.store import save_adapter

    if peft_saved(sections.method):
        return save_adapter(model, out, manifest, force=force)
    return own_format.save(model, sections.method, sections.method_config(), out, manifest,
                           base=base, force=force)
