"""Adapter states as Flower's legacy parameter lists (SecAgg+ runs on the legacy stack).

Both sides order the tensors as the scenario's initial adapter does, so a list needs no names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

State = dict[str, Any]


def to_arrays(state: State, keys: list[str]) -> list[np.ndarray]:
    """An adapter state as a legacy parameter list, in ``keys`` order."""
    return [state[k].detach().float().numpy() for k in keys]


def from_arrays(arrays: list[np.ndarray], keys: list[str]) -> State:
    """The inverse of :func:`to_arrays`."""
    import torch

    if len(arrays) != len(keys):
        raise ValueError(f"{len(arrays)} arrays for an adapter of {len(keys)} tensors")
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)).clone()
            for k, a in zip(keys, arrays, strict=True)}
