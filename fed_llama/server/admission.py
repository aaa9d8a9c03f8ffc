"""What the aggregator checks of every update before it is aggregated.

An update must have exactly the global adapter's tensor names, shapes and dtypes, hold only
finite values of bounded magnitude, leave frozen tensors as they were, and change the global
adapter by no more than the configured bounds (an absolute L2 bound, and a multiple of the
median change of the round's updates). Each failure raises
:class:`~fed_llama.crypto.Refused` with its reason, so the round goes on without it.
"""

from __future__ import annotations

import statistics

import torch

from fed_llama.adapter.rank import A_TAG, B_TAG, lora_pairs
from fed_llama.adapter.state import State
from fed_llama.crypto.refusal import Refused

MAX_ABS_VALUE = 1e6
"""Largest magnitude of an adapter value (trained LoRA factors stay below 10): keeps every
product and sum the aggregation computes finite."""


def expected_shape(name: str, shape: tuple[int, ...], rank: int | None) -> tuple[int, ...]:
    """The shape of tensor ``name`` at LoRA rank ``rank`` (None: the global adapter's)."""
    if rank is None or len(shape) != 2:
        return shape
    if A_TAG in name:
        return (rank, shape[1])
    if B_TAG in name:
        return (shape[0], rank)
    return shape


def check_update(update: State, current: State, rank: int | None = None) -> None:
    """Refuse ``update`` unless it has the global adapter's tensors (at the site's ``rank``
    when sites train their own ranks) and only finite values."""
    if set(update) != set(current):
        missing, extra = sorted(set(current) - set(update)), sorted(set(update) - set(current))
        raise Refused("wrong-names", f"{len(missing)} tensor(s) missing (e.g. {missing[:1]}), "
                      f"{len(extra)} unexpected (e.g. {extra[:1]})")
    for name, ref in current.items():
        got = update[name]
        if not isinstance(got, torch.Tensor):
            raise Refused("wrong-dtype", f"{name}: not a tensor")
        want = expected_shape(name, tuple(ref.shape), rank)
        if tuple(got.shape) != want:
            raise Refused("wrong-shape", f"{name}: shape {tuple(got.shape)}, expected {want}")
        if got.dtype != ref.dtype:
            raise Refused("wrong-dtype", f"{name}: dtype {got.dtype}, the global adapter's is "
                          f"{ref.dtype}")
        if not bool(torch.isfinite(got).all()):
            raise Refused("non-finite", f"{name}: holds NaN or Inf")
        if got.numel() and float(got.abs().max()) > MAX_ABS_VALUE:
            raise Refused("norm-bound", f"{name}: a value of magnitude "
                          f"{float(got.abs().max()):.3g}, over {MAX_ABS_VALUE:.0e}")


def check_frozen(update: State, current: State, frozen: set[str]) -> None:
    """Refuse ``update`` if it changed a tensor the method keeps frozen (FFA-LoRA's A)."""
    for name in sorted(frozen):
        if not torch.equal(update[name], current[name]):
            raise Refused("frozen-changed", f"{name}: changed, but it is frozen (FFA-LoRA "
                          "trains B only)")


def change_norm(update: State, current: State, scales: tuple[float, float] | None = None
                ) -> float:
    """The L2 norm of ``update - current`` over every tensor; with ``scales`` (the update's
    and the global ``alpha / r``), of the change of each layer's ``scale * B @ A`` instead,
    which compares updates of different ranks."""
    if scales is None:
        total = sum(float(((update[k].double() - current[k].double()) ** 2).sum())
                    for k in current)
        return float(total ** 0.5)
    total = 0.0
    for a, b in lora_pairs(current):
        new = scales[0] * update[b].double() @ update[a].double()
        old = scales[1] * current[b].double() @ current[a].double()
        total += float(((new - old) ** 2).sum())
    return float(total ** 0.5)


def check_norm(norm: float, max_norm: float) -> None:
    if max_norm and norm > max_norm:
        raise Refused("norm-bound", f"the update changes the adapter by {norm:.4g}; the bound "
                      f"(security.max_update_norm) is {max_norm:.4g}")


def norm_outliers(norms: list[float], factor: float) -> list[int]:
    """Indices of changes more than ``factor`` times the median of ``norms`` (3 or more)."""
    if not factor or len(norms) < 3:
        return []
    median = statistics.median(norms)
    return [i for i, n in enumerate(norms) if n > factor * max(median, 1e-12)]
