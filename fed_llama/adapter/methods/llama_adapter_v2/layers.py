"""The change LLaMA-Adapter V2 makes to each adapted projection: a learnable bias and scale.

The projection module stays where it is (its weight keeps its name, an NF4 ``Linear4bit``
stays quantized); it gains two parameters, ``adapter_bias`` (zeros) and ``adapter_scale``
(ones), and a forward hook that returns ``s ⊙ (base(x) + b)``. At init the hook changes
nothing. It folds into one linear layer: ``W' = diag(s)·W``, ``b' = s ⊙ (b₀ + b)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BIAS, SCALE = "adapter_bias", "adapter_scale"


def _scaled(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    bias, scale = getattr(module, BIAS), getattr(module, SCALE)
    return scale.to(output.dtype) * (output + bias.to(output.dtype))


def add_bias_and_scale(linear: nn.Module, out_features: int) -> None:
    """Give ``linear`` a learnable output bias and scale (idempotent)."""
    if hasattr(linear, SCALE):
        return
    linear.register_parameter(BIAS, nn.Parameter(torch.zeros(out_features)))
    linear.register_parameter(SCALE, nn.Parameter(torch.ones(out_features)))
    linear.register_forward_hook(_scaled)


def fold_bias_and_scale(weight: torch.Tensor, bias: torch.Tensor | None,
                        adapter_bias: torch.Tensor, adapter_scale: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of the one linear layer that computes ``s ⊙ (W·x + b₀ + b)``: fp32."""
    s = adapter_scale.detach().float()
    b0 = bias.detach().float() if bias is not None else torch.zeros_like(s)
    return s[:, None] * weight.detach().float(), s * (b0 + adapter_bias.detach().float())
