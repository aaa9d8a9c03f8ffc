"""LoRA factors from a product and back, at any rank: the maths behind exact aggregation and
sites that train a different rank from the global adapter's.

A LoRA layer adds ``scale * B @ A`` (``scale = alpha / r``). :func:`factorize` splits a product
``M`` into rank-``r`` factors with ``scale * B @ A`` the best rank-``r`` approximation of ``M``
(truncated SVD, the square roots of the singular values on each side).
"""

from __future__ import annotations

import torch

from fed_llama.adapter.state import State

A_TAG, B_TAG = "lora_A", "lora_B"


def lora_pairs(state: State) -> list[tuple[str, str]]:
    """(A key, B key) for every adapted layer, in name order."""
    pairs = []
    for key in sorted(state):
        if A_TAG in key:
            b_key = key.replace(A_TAG, B_TAG)
            if b_key not in state:
                raise ValueError(f"{key} has no matching {B_TAG} tensor")
            pairs.append((key, b_key))
    if not pairs:
        raise ValueError("no LoRA tensors (names with lora_A / lora_B) in the update")
    return pairs


def factorize(product: torch.Tensor, rank: int, scale: float,
              fill_a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative residual) with ``scale * B @ A`` the best rank-``rank`` approximation.

    Directions with a zero singular value would leave both factors zero, and such a LoRA
    direction never trains again (each factor's gradient is proportional to the other); with
    ``fill_a``, those rows of A are taken from it (B's columns stay zero, so the product is
    the same).
    """
    u, sv, vh = torch.linalg.svd(product.float(), full_matrices=False)
    k = min(rank, sv.numel())
    root = torch.sqrt(sv[:k] / scale)
    b = torch.zeros(product.shape[0], rank)
    a = torch.zeros(rank, product.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    if fill_a is not None:
        dead = torch.ones(rank, dtype=torch.bool)
        dead[:k] = root <= 1e-12
        a[dead] = fill_a.float()[dead]
        b[:, dead] = 0.0
    norm = float(torch.linalg.norm(product))
    residual = float(torch.linalg.norm(product - scale * b @ a)) / norm if norm > 0 else 0.0
    return a, b, residual


def change_rank(state: State, *, scale: float, rank: int, new_scale: float,
                fill: State | None = None) -> State:
    """The same adapter (the same ``scale * B @ A`` up to truncation) at another rank.

    ``fill``: an adapter of the new rank whose A rows fill directions the product lacks (a
    site's own seeded initialization).
    """
    out: State = {}
    for a_key, b_key in lora_pairs(state):
        product = scale * state[b_key].float() @ state[a_key].float()
        a, b, _ = factorize(product, rank, new_scale, fill[a_key] if fill else None)
        out[a_key], out[b_key] = a, b
    return out
