"""The Excitor block: an extra key for each token, reconstructed from the token and prompts."""

from __future__ import annotations

import math

import torch
from torch import nn


class ExcitorKeys(nn.Module):
    """``x ↦ tanh(g) ⊙ K_extra(x)`` for the layer's input ``x`` (b, T, H):

        w = softmax((x·A_q)(P·A_k)ᵀ / √r)      the token's affinity to the L prompts
        K_extra = (w·P)·W_down·W_up             a key reconstructed from the prompts

    with prompts ``P`` (L x H), ``A_q``, ``A_k``, ``W_down`` (H x r), ``W_up``
    (r x kv_heads·head_dim) and a gate ``g`` per KV head, zero at init.
    """

    def __init__(self, hidden: int, kv_heads: int, head_dim: int, length: int, rank: int,
                 generator: torch.Generator) -> None:
        super().__init__()

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(std * torch.randn(*shape, generator=generator))

        self.kv_heads, self.head_dim, self.rank = kv_heads, head_dim, rank
        self.prompt = normal(length, hidden, std=0.02)
        self.a_q = normal(hidden, rank, std=1 / math.sqrt(hidden))
        self.a_k = normal(hidden, rank, std=1 / math.sqrt(hidden))
        self.down = normal(hidden, rank, std=1 / math.sqrt(hidden))
        self.up = normal(rank, kv_heads * head_dim, std=1 / math.sqrt(rank))
        self.gate = nn.Parameter(torch.zeros(kv_heads, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        prompt = self.prompt.to(dtype)
        scores = (x @ self.a_q.to(dtype)) @ (prompt @ self.a_k.to(dtype)).T
        affinity = torch.softmax(scores / math.sqrt(self.rank), dim=-1, dtype=torch.float32)
        context = affinity.to(dtype) @ prompt                          # (b, T, H)
        extra = (context @ self.down.to(dtype)) @ self.up.to(dtype)     # (b, T, kv·hd)
        shaped = extra.view(*x.shape[:-1], self.kv_heads, self.head_dim)
        return (torch.tanh(self.gate).to(dtype) * shaped).flatten(-2)
