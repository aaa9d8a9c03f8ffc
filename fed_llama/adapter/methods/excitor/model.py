"""LLaMA-Excitor on a frozen ``LlamaForCausalLM``: attach, state, count.

The survey (eqs. 27-31) writes the Excitor as attention logits ``L = Q·Kᵀ/√d`` plus a
learned, zero-initialized term ``B = f_exc(P; θ)`` before the softmax, ``A = softmax(L + B)``,
with values unchanged. The paper's official code is not published; we implement this reading
of its §3: for the input ``x_t`` of an Excitor layer (token t, after the layer's norm)

    w_t       = softmax((x_t·A_q)(P·A_k)ᵀ / √r)            affinity to the prompts P
    K_extra_t = (w_t·P)·W_down·W_up                         extra key for token t
    K'_t      = K_t + tanh(g) ⊙ K_extra_t                   (g per KV head, zero at init)
    A         = softmax(Q·K'ᵀ/√d + mask)                    rotary position on Q and K'
    out       = W_o·(A·V)

so the extra similarity ``tanh(g)·Q·K_extraᵀ/√d`` is added to the logits through the
cold-start gate. Because ``K_extra`` depends only on the key's own token, the logits are plain
attention on the modified keys: the KV cache stores ``K'`` and generation needs nothing else
(and an export needs only a branch on the key path).

Trainable (``N`` = ``layers`` top layers, ``L`` prompts, ``H`` hidden size, ``r`` rank,
``kv`` KV heads, ``d`` head dim)::

    count = N · (L·H + 3·H·r + r·kv·d + kv)

On SmolLM2-135M with the defaults (N = 30, L = 10, r = 16): 30 · 36,483 = 1,094,490
parameters (0.81% of the backbone).
"""

from __future__ import annotations

from typing import Any

import torch

from fed_llama.adapter.methods.attention import AdaptedAttention
from fed_llama.adapter.methods.excitor.config import ExcitorConfig
from fed_llama.adapter.methods.excitor.layers import ExcitorKeys

NAME = "excitor"


def _dims(config: Any) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.hidden_size, config.num_key_value_heads, head_dim


def parameter_count(config: Any, cfg: ExcitorConfig) -> int:
    """The module docstring's formula."""
    hidden, kv, head_dim = _dims(config)
    per_layer = (cfg.prompt_length * hidden + 3 * hidden * cfg.rank + cfg.rank * kv * head_dim
                 + kv)
    return min(cfg.layers, config.num_hidden_layers) * per_layer


def attach(model: Any, cfg: ExcitorConfig, seed: int) -> Any:
    """Freeze ``model`` and add an Excitor block to its top ``cfg.layers`` layers in place."""
    for param in model.parameters():
        param.requires_grad_(False)
    hidden, kv, head_dim = _dims(model.config)
    layers = model.model.layers
    generator = torch.Generator().manual_seed(seed)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    for layer in layers[len(layers) - min(cfg.layers, len(layers)):]:
        attn = AdaptedAttention.adapt(layer.self_attn)
        attn.key_branch = ExcitorKeys(hidden, kv, head_dim, cfg.prompt_length, cfg.rank,
                                      generator).to(dtype)
    return model
