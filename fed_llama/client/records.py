"""Reading the records of a Flower message at the site."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from fed_llama import wire
from fed_llama.adapter.state import State


def torch_state(record: ArrayRecord) -> State:
    """The record's tensors as torch tensors. torch is imported here, not when this module is
    (Flower may load the apps in two threads at once; see fed_llama.launch.flwr_run), and
    Flower converts only once torch is imported."""
    import torch  # noqa: F401

    return dict(record.to_torch_state_dict())


def scalars(record: Any) -> dict[str, float]:
    """The numeric entries of a MetricRecord."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def round_number(config: Any) -> int:
    """The run's round a train message is for (fed-llama's, else Flower's; 0 when neither
    is a whole number)."""
    value = config.get(wire.ROUND, config.get(wire.FLOWER_ROUND, 0))
    return value if isinstance(value, int) else 0
