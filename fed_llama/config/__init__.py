"""Typed configuration: frozen dataclasses loaded from TOML (see :mod:`fed_llama.config.loader`)."""

from fed_llama.config.loader import build_config, load_config
from fed_llama.config.train import (
    BackboneConfig,
    DataConfig,
    LoraConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "LoraConfig",
    "OptimConfig",
    "TrainConfig",
    "build_config",
    "load_config",
]
