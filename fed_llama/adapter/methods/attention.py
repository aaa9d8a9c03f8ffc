"""LLaMA attention with the two branches the survey's adapters add, on a frozen layer.

:class:`AdaptedAttention` is transformers' ``LlamaAttention`` with the same weights and two
optional, zero-initialized additions (a layer is switched to it in place, so every backbone
parameter keeps its name):

* **Gated adaption prompts** (LLaMA-Adapter V1/V2, Zhang et al. 2023, eq. 7-8): ``L`` learnable
  prompt vectors ``P`` per layer; their keys and values come from the layer's own (frozen)
  ``k_proj`` / ``v_proj``, without rotary position; every query attends to them with its own
  softmax, and the result, times ``tanh(g)`` per head (``g`` zero at init), is added to the
  attention output before ``o_proj``::

      out = softmax(Q·Kᵀ/√d + mask)·V + tanh(g) ⊙ softmax(Q·K_Pᵀ/√d)·V_P

* **An Excitor key branch** (:mod:`fed_llama.adapter.methods.excitor`): the keys are
  ``K + tanh(g) ⊙ K_extra`` before rotary position, so the attention logits become
  ``Q·Kᵀ/√d + tanh(g)·Q·K_extraᵀ/√d`` and the KV cache stores the modified keys.

With every gate at zero the layer computes exactly what the frozen layer computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
    repeat_kv,
)

KeyBranch = Callable[[torch.Tensor], torch.Tensor]
"""hidden states (b, T, hidden) -> extra keys (b, T, kv_heads * head_dim), gate applied."""


class AdaptedAttention(LlamaAttention):
    """``LlamaAttention`` plus gated adaption prompts and/or an extra-key branch."""

    adaption_prompt: nn.Parameter | None
    adaption_gate: nn.Parameter | None
    key_branch: nn.Module | None

    @classmethod
    def adapt(cls, attn: LlamaAttention) -> AdaptedAttention:
        """Switch ``attn`` to this class in place (same weights, same parameter names)."""
        if not isinstance(attn, AdaptedAttention):
            attn.__class__ = cls
            for name in ("adaption_prompt", "adaption_gate", "key_branch"):
                setattr(attn, name, None)
        assert isinstance(attn, AdaptedAttention)
        return attn

    def add_prompts(self, length: int, hidden: int, generator: torch.Generator) -> None:
        """``length`` prompt vectors (normal, std 0.02) and a zero gate per attention head."""
        heads = self.config.num_attention_heads
        dtype = self.o_proj.weight.dtype if self.o_proj.weight.is_floating_point() else None
        self.adaption_prompt = nn.Parameter(
            0.02 * torch.randn(1, length, hidden, generator=generator).to(dtype or torch.float32))
        self.adaption_gate = nn.Parameter(torch.zeros(1, heads, 1, 1))

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is None:  # transformers 5.x still passes the old name in places
            cache = kwargs.pop("past_key_values", None)
        else:
            kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states)
        if self.key_branch is not None:
            keys = keys + self.key_branch(hidden_states)
        key = keys.view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        assert position_embeddings is not None
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        interface: Callable[..., tuple[torch.Tensor, torch.Tensor]] = (
            ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                  eager_attention_forward))
        out, weights = interface(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        if self.adaption_prompt is not None and self.adaption_gate is not None:
            out = out + self._prompt_branch(query).transpose(1, 2)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights

    def _prompt_branch(self, query: torch.Tensor) -> torch.Tensor:
        """tanh(g) ⊙ softmax(Q·K_Pᵀ/√d)·V_P, shape (b, heads, T, head_dim)."""
        assert self.adaption_prompt is not None and self.adaption_gate is not None
        prompt = self.adaption_prompt.to(query.dtype)
        length = prompt.shape[1]
        pk = self.k_proj(prompt).view(1, length, -1, self.head_dim).transpose(1, 2)
        pv = self.v_proj(prompt).view(1, length, -1, self.head_dim).transpose(1, 2)
        pk = repeat_kv(pk, self.num_key_value_groups)
        pv = repeat_kv(pv, self.num_key_value_groups)
        scores = torch.matmul(query, pk.transpose(2, 3)) * self.scaling
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.tanh(self.adaption_gate).to(query.dtype) * torch.matmul(probs, pv)
