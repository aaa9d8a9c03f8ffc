"""Aggregating LoRA adapters from several sites (pure tensor maths, no Flower).

An adapter is peft's state dict: for each adapted layer ``...lora_A.weight`` (r x in) and
``...lora_B.weight`` (out x r); the layer's update is ``scale * B @ A`` with
``scale = alpha / r``.

* :func:`mean_of_factors` (FedAvg on factors): the weighted mean of each A and each B. Cheap
  and sum-compatible, but the mean of products is not the product of means, so it is biased.
* :func:`mean_of_products` (exact): the weighted mean of each layer's ``scale_i * B_i @ A_i``,
  re-factorized to the global rank by truncated SVD. Exact up to the truncation (reported), and
  it takes sites of different ranks.
* :func:`mean_of_b` (FFA-LoRA): A is frozen at a shared seed on every site and only B is
  trained, so the mean of B is the exact mean of the updates; needs only a weighted sum.
* Robust options against a bad site: :func:`clip_norms`, :func:`coordinate_median`,
  :func:`trimmed_mean`.

Weights are the sites' example counts; they are normalized here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fed_llama.adapter.rank import A_TAG, B_TAG, factorize, lora_pairs

State = dict[str, torch.Tensor]


def _normalized(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n or n == 0:
        raise ValueError(f"need one weight per update; got {len(weights)} for {n} updates")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
    total = float(sum(weights))
    return [w / total for w in weights]


def _same_keys(states: Sequence[State]) -> list[str]:
    keys = sorted(states[0])
    for i, s in enumerate(states[1:], start=1):
        if sorted(s) != keys:
            raise ValueError(f"update {i} has other tensors than update 0: "
                             f"{sorted(set(s) ^ set(keys))[:3]}")
    return keys


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> State:
    """The weighted mean of every tensor (all updates must have the same names and shapes)."""
    w = _normalized(weights, len(states))
    return {k: torch.stack([wi * s[k].float() for wi, s in zip(w, states, strict=True)]).sum(0)
            for k in _same_keys(states)}


def mean_of_factors(states: Sequence[State], weights: Sequence[float]) -> State:
    """FedAvg on the LoRA factors: mean of each A and each B."""
    return weighted_mean(states, weights)


@dataclass(frozen=True)
class ExactResult:
    """The re-factorized global adapter and how much the rank truncation lost."""

    state: State
    relative_residual: float
    """max over layers of ||M - B A||_F / ||M||_F, where M is the mean product (0 = exact)."""


def mean_of_products(states: Sequence[State], weights: Sequence[float], *,
                     scales: Sequence[float], rank: int, global_scale: float) -> ExactResult:
    """Exact aggregation: mean of ``scale_i * B_i @ A_i`` per layer, truncated to ``rank``.

    ``scales[i]`` is site i's ``alpha / r_i`` (so sites may train different ranks);
    the result is factorized so that ``global_scale * B @ A`` is the best rank-``rank``
    approximation of the mean update, split evenly between the factors (``sqrt`` of the
    singular values on each side).
    """
    w = _normalized(weights, len(states))
    if len(scales) != len(states):
        raise ValueError("need one scale (alpha / r) per update")
    pair_keys = [lora_pairs(s) for s in states]
    if any(keys != pair_keys[0] for keys in pair_keys[1:]):
        raise ValueError("updates adapt different layers")
    out: State = {}
    worst = 0.0
    for a_key, b_key in pair_keys[0]:
        mean = torch.stack([wi * si * (s[b_key].float() @ s[a_key].float())
                            for wi, si, s in zip(w, scales, states, strict=True)]).sum(0)
        out[a_key], out[b_key], residual = factorize(mean, rank, global_scale)
        worst = max(worst, residual)
    return ExactResult(state=out, relative_residual=worst)


def mean_of_b(states: Sequence[State], weights: Sequence[float], frozen_a: State) -> State:
    """FFA-LoRA: A stays ``frozen_a``; B is the weighted mean. Refuses a changed A."""
    for i, s in enumerate(states):
        for key, a in frozen_a.items():
            if not torch.equal(s[key], a):
                raise ValueError(f"update {i} changed the frozen {key} (FFA-LoRA trains B only)")
    b_only = [{k: v for k, v in s.items() if B_TAG in k} for s in states]
    return {**{k: v.clone() for k, v in frozen_a.items()}, **weighted_mean(b_only, weights)}


def flat_norm(state: State) -> float:
    """The L2 norm of all tensors of an update together."""
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in state.values()))


def clip_norms(deltas: Sequence[State], max_norm: float) -> list[State]:
    """Scale each update (a difference from the global adapter) to norm at most ``max_norm``."""
    out = []
    for d in deltas:
        norm = flat_norm(d)
        factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
        out.append({k: v.float() * factor for k, v in d.items()})
    return out


def _sorted_with_weights(states: Sequence[State], key: str, weights: Sequence[float] | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The updates' values of tensor ``key`` sorted along the update axis, and the
    normalized weight that follows each value (equal when ``weights`` is None)."""
    n = len(states)
    w = torch.tensor(_normalized(weights if weights is not None else [1.0] * n, n),
                     dtype=torch.float64)
    stacked, order = torch.stack([s[key].float() for s in states]).sort(dim=0)
    return stacked, w[order]


def coordinate_median(states: Sequence[State], weights: Sequence[float] | None = None
                      ) -> State:
    """The element-wise weighted median of the updates (robust to a minority of bad sites):
    the value at which the sorted updates' weights first reach half, or the mean of the two
    values around half when it falls between them. Equal weights: the median (for an even
    count, the mean of the two middle values)."""
    out = {}
    for k in _same_keys(states):
        stacked, w = _sorted_with_weights(states, k, weights)
        cum = w.cumsum(dim=0)
        eps = 1e-9
        lower = (cum < 0.5 - eps).sum(dim=0, keepdim=True)   # first index reaching half
        upper = (cum <= 0.5 + eps).sum(dim=0, keepdim=True)  # first index passing half
        upper = upper.clamp(max=len(states) - 1)
        out[k] = (stacked.gather(0, lower) + stacked.gather(0, upper)).squeeze(0) / 2
    return out


def trimmed_mean(states: Sequence[State], trim: float, weights: Sequence[float] | None = None
                 ) -> State:
    """The element-wise mean after dropping the ``trim`` fraction of largest and smallest
    updates (``floor(trim * n)`` on each side), the values kept weighted by ``weights``."""
    n = len(states)
    cut = math.floor(trim * n)
    if not 0 <= trim < 0.5 or n - 2 * cut < 1:
        raise ValueError(f"trim must be in [0, 0.5) and leave at least one update; got {trim}")
    out = {}
    for k in _same_keys(states):
        stacked, w = _sorted_with_weights(states, k, weights)
        kept, kw = stacked[cut:n - cut].double(), w[cut:n - cut]
        out[k] = ((kept * kw).sum(dim=0) / kw.sum(dim=0)).float()
    return out


def combine(current: State, states: Sequence[State], weights: Sequence[float], *,
            aggregation: str, robust: str = "none", trim_fraction: float = 0.2,
            clip_norm: float = 0.0, rank: int, alpha: float,
            site_ranks: Sequence[int] | None = None) -> tuple[State, dict[str, float]]:
    """One round's aggregation as a scenario configures it; returns the state and facts.

    With ``clip_norm``, each site's difference from ``current`` is clipped first.
    ``site_ranks``: the rank each update was trained at (exact mode; default ``rank``).
    """
    info: dict[str, float] = {}
    if clip_norm:
        deltas = [{k: s[k].float() - current[k].float() for k in current} for s in states]
        info["max-update-norm"] = max(flat_norm(d) for d in deltas)
        clipped = clip_norms(deltas, clip_norm)
        states = [{k: current[k].float() + d[k] for k in current} for d in clipped]
    if site_ranks and (clip_norm or len(site_ranks) != len(states)):
        raise ValueError("site_ranks need one rank per update, and no clipping")
    if aggregation == "exact":
        scales = [alpha / r for r in (site_ranks or [rank] * len(states))]
        result = mean_of_products(states, weights, scales=scales, rank=rank,
                                  global_scale=alpha / rank)
        info["svd-relative-residual"] = result.relative_residual
        return result.state, info
    if aggregation == "ffa":
        return mean_of_b(states, weights, {k: v for k, v in current.items() if A_TAG in k}), info
    if robust == "median":
        return coordinate_median(states, weights), info
    if robust == "trimmed-mean":
        return trimmed_mean(states, trim_fraction, weights), info
    return mean_of_factors(states, weights), info
