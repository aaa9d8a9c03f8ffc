"""The adapter methods a site can train, one sub-package each (like peft's ``tuners/``).

Each method keeps in one place its settings (``config.py``, a frozen dataclass: no torch),
how it attaches to a frozen ``LlamaForCausalLM`` and the formula of its trainable parameter
count (``model.py``), and its layers. Everything downstream works from the state a method
declares: its trainable tensors by saved name (:mod:`fed_llama.adapter.state`).

=====================  ======================================  ========  ===================
method                 what trains                             saved as  folds into backbone
=====================  ======================================  ========  ===================
``lora`` (and QLoRA)   low-rank A, B on chosen projections     peft      yes (merge)
``llama-adapter``      V1: gated adaption prompts, top layers  peft      no
``llama-adapter-v2``   bias + scale per projection, norms,     ours      bias/scale/norms
                       gated prompts (optional)                          yes; prompts no
``excitor``            prompts + low-rank extra-key block      ours      no
=====================  ======================================  ========  ===================

Importing this package loads no torch; :func:`method_of` imports a method when asked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

METHODS = ("lora", "llama-adapter", "llama-adapter-v2", "excitor")
"""Every method's name, as ``[adapter] method`` takes it."""

_PACKAGES = {"llama-adapter": ("llama_adapter", "LlamaAdapterConfig"),
             "llama-adapter-v2": ("llama_adapter_v2", "LlamaAdapterV2Config"),
             "excitor": ("excitor", "ExcitorConfig")}


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of fed-llama needs of a (non-LoRA) method."""

    name: str
    config_type: type
    attach: Any
    """``(model, cfg, seed) -> model``: freeze the backbone, add the method's parameters."""
    parameter_count: Any
    """``(llama_config, cfg) -> int``: the formula in the method's docstring."""
    peft_native: bool
    """Saved by peft (``PeftModel.save_pretrained``) rather than in our own format."""


def method_of(name: str) -> MethodSpec:
    """The method called ``name`` (one of :data:`METHODS` other than ``lora``)."""
    if name not in _PACKAGES:
        raise ValueError(f"adapter method {name!r} is not one of {', '.join(_PACKAGES)}")
    package, config_name = _PACKAGES[name]
    model = importlib.import_module(f"fed_llama.adapter.methods.{package}.model")
    config = importlib.import_module(f"fed_llama.adapter.methods.{package}.config")
    return MethodSpec(name, getattr(config, config_name), model.attach, model.parameter_count,
                      peft_native=name == "llama-adapter")
