"""Which adapter method a run trains (``[adapter] method``) and that method's settings.

LoRA keeps ``[lora]`` (and QLoRA is LoRA on the NF4 backbone); each other method has its own
section, parsed into the frozen dataclass its package declares (``fed_llama.adapter.methods.
<method>.config``: stdlib only, part of this config layer, see docs/architecture.md):

=====================  ======================  ========================================
``adapter.method``     section                 dataclass
=====================  ======================  ========================================
``lora``               ``[lora]``              :class:`LoraConfig`
``llama-adapter``      ``[llama_adapter]``     ``LlamaAdapterConfig`` (V1, peft)
``llama-adapter-v2``   ``[llama_adapter_v2]``  ``LlamaAdapterV2Config``
``excitor``            ``[excitor]``           ``ExcitorConfig``
=====================  ======================  ========================================

A section of a method that is not the chosen one, or a non-default ``[lora]`` key with
another method, is refused with its reason (:meth:`MethodSections.given_problems`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from fed_llama.adapter.methods.excitor.config import ExcitorConfig
from fed_llama.adapter.methods.llama_adapter.config import LlamaAdapterConfig
from fed_llama.adapter.methods.llama_adapter_v2.config import LlamaAdapterV2Config

METHOD_NAMES = ("lora", "llama-adapter", "llama-adapter-v2", "excitor")
"""``[adapter] method`` values (the same as ``fed_llama.adapter.methods.METHODS``)."""

#: The linear layers of a LLaMA block that LoRA can adapt.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """The low-rank adapter every site trains (peft's LoRA)."""

    r: int = 8
    """Rank of the update ``B @ A``."""

    alpha: int = 16
    """Scaling numerator: the update is ``(alpha / r) * B @ A``."""

    dropout: float = 0.05
    """Dropout on the adapter's input during training."""

    target_modules: tuple[str, ...] = ATTENTION_MODULES
    """Which linear layers get an adapter: any of q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj."""

    include_mlp: bool = False
    """Also adapt the MLP projections (gate_proj, up_proj, down_proj)."""

    def modules(self) -> tuple[str, ...]:
        """The target modules, with the MLP projections when ``include_mlp`` is set."""
        extra = MLP_MODULES if self.include_mlp else ()
        return tuple(dict.fromkeys(self.target_modules + extra))

    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"r must be at least 1; got {self.r}")
        if self.alpha < 1:
            out.append(f"alpha must be at least 1; got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout must be in [0, 1); got {self.dropout}")
        known = ATTENTION_MODULES + MLP_MODULES
        unknown = [m for m in self.target_modules if m not in known]
        if unknown:
            out.append(f"target_modules has unknown layers {unknown}: use any of {list(known)}")
        if not self.target_modules:
            out.append("target_modules must name at least one layer, e.g. ['q_proj', 'v_proj']")
        return out


SECTIONS = {"lora": "lora", "llama-adapter": "llama_adapter",
            "llama-adapter-v2": "llama_adapter_v2", "excitor": "excitor"}
"""The config section (table) of each method's settings."""


@dataclass(frozen=True)
class AdapterConfig:
    """The parameter-efficient method every site trains ([adapter])."""

    method: Literal["lora", "llama-adapter", "llama-adapter-v2", "excitor"] = "lora"
    """``lora`` (settings in [lora]; on ``backbone.quantization = "nf4"`` it is QLoRA),
    ``llama-adapter`` (LLaMA-Adapter V1, [llama_adapter]), ``llama-adapter-v2`` ([llama_adapter_v2])
    or ``excitor`` (LLaMA-Excitor, [excitor]). docs/federation.md compares them."""


def method_label(method: str, quantization: str) -> str:
    """The method as manifests and site configs name it: ``qlora`` for LoRA on an NF4
    backbone, else the method's own name."""
    return "qlora" if method == "lora" and quantization == "nf4" else method


def lora_only_problems(method: str, aggregation: str, site_ranks: tuple[int, ...]) -> list[str]:
    """A federation option that only LoRA's factors have, with another method."""
    if method == "lora":
        return []
    out = []
    if aggregation != "factors":
        out.append(f"federation.aggregation = {aggregation!r} works on LoRA's A and B factors, "
                   f"but adapter.method = {method!r}: set aggregation = 'factors' (the plain "
                   "per-tensor mean)")
    if site_ranks:
        out.append(f"federation.site_ranks gives LoRA ranks, but adapter.method = {method!r}: "
                   "leave site_ranks empty")
    return out


@dataclass(frozen=True)
class MethodSections:
    """The [adapter] choice and every method's section (a config class with a method)."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """Which method trains ([adapter])."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA's shape ([lora]; ``adapter.method = "lora"`` only)."""

    llama_adapter: LlamaAdapterConfig = field(default_factory=LlamaAdapterConfig)
    """LLaMA-Adapter V1's settings ([llama_adapter]; ``adapter.method = "llama-adapter"``)."""

    llama_adapter_v2: LlamaAdapterV2Config = field(default_factory=LlamaAdapterV2Config)
    """LLaMA-Adapter V2's settings ([llama_adapter_v2]; ``adapter.method =
    "llama-adapter-v2"``)."""

    excitor: ExcitorConfig = field(default_factory=ExcitorConfig)
    """LLaMA-Excitor's settings ([excitor]; ``adapter.method = "excitor"``)."""

    @property
    def method(self) -> str:
        """The chosen method's name."""
        return self.adapter.method

    def method_config(self) -> Any:
        """The chosen method's settings (a LoraConfig for LoRA)."""
        return getattr(self, SECTIONS[self.adapter.method])

    def method_settings(self) -> dict[str, Any]:
        """The chosen method's settings as plain data (what a manifest records)."""
        data = dataclasses.asdict(self.method_config())
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def method_problems(self) -> list[str]:
        """A non-default [lora] key with another method."""
        if self.adapter.method == "lora":
            return []
        default = LoraConfig()
        return [f"lora.{f.name} = {getattr(self.lora, f.name)!r} is a LoRA setting, but "
                f"adapter.method = {self.adapter.method!r}: remove it from [lora], or set "
                "adapter.method = 'lora'"
                for f in dataclasses.fields(LoraConfig)
                if getattr(self.lora, f.name) != getattr(default, f.name)]

    def problems(self) -> list[str]:
        return self.method_problems()

    def given_problems(self, given: frozenset[str]) -> list[str]:
        """A section of a method that is not the chosen one (called by the config loader
        with the tables the file gives)."""
        chosen = self.adapter.method
        return [f"[{section}] configures {method}, but adapter.method = {chosen!r}: remove "
                f"[{section}], or set adapter.method = {method!r}"
                for method, section in SECTIONS.items()
                if method not in ("lora", chosen) and section in given]
