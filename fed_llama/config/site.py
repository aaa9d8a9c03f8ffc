"""What a site decides for itself when it joins a federation: its site config.

A site's SuperNode names the file in its node config
(``flower-supernode ... --node-config "site-config='/srv/site/site.toml'"``); the ClientApp
reads it at the site and nothing in it leaves the site. The federation's own settings
(rounds, aggregation, local training, the adapter's method and shape, the security policy)
reach the site in the run's messages (:mod:`fed_llama.config.run_settings`); the site checks
that the method, the adapter's shape and the backbone's hash are the ones it agreed to, and
refuses the run otherwise. ``client/site-federation.toml`` is the annotated template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fed_llama.adapter.methods.excitor.config import ExcitorConfig
from fed_llama.adapter.methods.llama_adapter.config import LlamaAdapterConfig
from fed_llama.adapter.methods.llama_adapter_v2.config import LlamaAdapterV2Config
from fed_llama.config.adapter import SECTIONS
from fed_llama.config.loader import load_config
from fed_llama.config.train import ICD10_PREFIX, LoraConfig

SITE_CONFIG = "site-config"
"""The node config key naming a SuperNode's site config file (an absolute path)."""


@dataclass(frozen=True)
class SiteConfig:
    """A site's own settings in a federation (a TOML file its SuperNode names)."""

    name: str = ""
    """The site's name in the federation: one of the names the aggregator's scenario lists
    (``federation.sites``), and the name its key was made for (``fed-llama keys init-site``)."""

    source: str = field(default="", metadata={"path": True, "schemes": (ICD10_PREFIX,)})
    """The site's training data: a JSONL file, or ``icd10:<site>`` for a demo hospital."""

    heldout: str = field(default="", metadata={"path": True})
    """The site's held-out JSONL file (empty: the ICD-10 site's held-out codes, or the
    federation's ``data.val_fraction`` split of ``source``)."""

    site_key: str = field(default="", metadata={"path": True})
    """The site's signing key (``sites/<name>.key`` of ``fed-llama keys init-site``)."""

    server_public: str = field(default="", metadata={"path": True})
    """The aggregator's public key (``server.pub.json``, received from its operator)."""

    passphrase_env: str = ""
    """The environment variable holding the passphrase of ``site_key`` (empty: the key is
    not encrypted). Set it in the SuperNode's environment; the passphrase itself is never in a
    file."""

    backbone: str = field(default="smollm2-135m", metadata={"path": True,
                                                             "schemes": ("smollm2-",)})
    """The site's copy of the backbone: a built-in name, a local Hugging Face LLaMA folder or a
    ``.gguf`` file. Its hash must equal the aggregator's, or the site refuses the run."""

    backbone_cache: str = field(default="", metadata={"path": True})
    """Where converted backbones and this site's encoded data are cached (``FED_LLAMA_CACHE``;
    empty: the environment's setting, else ``~/.cache/fed-llama``). Each message starts a fresh
    ClientApp process: a cache on local disk keeps the conversion and the tokenization to the
    first. The data entries hold the site's records, readable by their owner only."""

    method: Literal["lora", "qlora", "llama-adapter", "llama-adapter-v2", "excitor"] = "lora"
    """The method the site agreed to train: ``lora`` (full-precision backbone), ``qlora``
    (LoRA on the 4-bit NF4 backbone), ``llama-adapter`` (V1), ``llama-adapter-v2`` or
    ``excitor``. A run of another method is refused."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter shape the site agreed to train ([lora]: ``r``, ``alpha``,
    ``target_modules``, ``include_mlp``); a run of another shape is refused (``dropout`` is
    the federation's)."""

    quantization: Literal["none", "nf4"] = "none"
    """The backbone precision the site agreed to for a method other than LoRA: ``none``
    (full precision) or ``nf4`` (4-bit NF4); a run on the other is refused. For LoRA,
    ``method = "qlora"`` says NF4."""

    llama_adapter: LlamaAdapterConfig = field(default_factory=LlamaAdapterConfig)
    """V1's settings the site agreed to ([llama_adapter]; ``method = "llama-adapter"``)."""

    llama_adapter_v2: LlamaAdapterV2Config = field(default_factory=LlamaAdapterV2Config)
    """V2's settings the site agreed to ([llama_adapter_v2]; ``method =
    "llama-adapter-v2"``)."""

    excitor: ExcitorConfig = field(default_factory=ExcitorConfig)
    """Excitor's settings the site agreed to ([excitor]; ``method = "excitor"``)."""

    def given_problems(self, given: frozenset[str]) -> list[str]:
        """A section of a method other than ``method``."""
        chosen = "lora" if self.method == "qlora" else self.method
        return [f"[{section}] configures {name}, but method = {self.method!r}: remove "
                f"[{section}], or set method = {name!r}"
                for name, section in SECTIONS.items()
                if name not in ("lora", chosen) and section in given]

    def problems(self) -> list[str]:
        out = []
        if not self.name.strip():
            out.append("name must be the site's name in the federation, e.g. 'cardiology'")
        if not self.source.strip():
            out.append("source must name the site's JSONL file or 'icd10:<site>'")
        if not self.backbone.strip():
            out.append("backbone must name the site's copy of the backbone")
        if self.method in ("lora", "qlora") and self.quantization != "none":
            out.append(f"quantization = {self.quantization!r} is for the other methods: LoRA on "
                       "the NF4 backbone is method = 'qlora'")
        return out


def load_site_config(path: str | Path) -> SiteConfig:
    """The site config at ``path``, checked (one ConfigError lists every problem)."""
    return load_config(SiteConfig, Path(path).expanduser())
