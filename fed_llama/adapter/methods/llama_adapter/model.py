"""LLaMA-Adapter V1 on a frozen ``LlamaForCausalLM`` with peft: attach, state, count.

peft's implementation (``tuners/adaption_prompt``) wraps the top layers' attention: prompt
keys and values come from the frozen ``k_proj`` / ``v_proj`` of the prompt (no rotary
position), a separate softmax over the prompt tokens, and
``out += o_proj(gate · softmax(Q·K_Pᵀ/√d)·V_P)``. **Which gate we ship:** peft's, one scalar
per layer, zero at init, without tanh. The paper's official code has one gate per head
through tanh; we keep peft's so that the saved folder is a plain peft adapter
(``PeftModel.from_pretrained`` loads it); V2 and Excitor (our own modules) use the paper's
per-head tanh gate.

Trainable (``N`` = ``layers``, ``L`` = ``prompt_length``, ``H`` = hidden size)::

    count = N · (L·H + 1)

On SmolLM2-135M with the defaults (N = 30, L = 10): 30 · 5,761 = 172,830 parameters (0.13%).
While the adapter is attached peft renames the wrapped attention's weights
(``self_attn.model.q_proj``); the adapter's state uses peft's saved names
(``...self_attn.adaption_prompt``, ``...self_attn.adaption_gate``).
"""

from __future__ import annotations

from typing import Any

import torch

from fed_llama.adapter.methods.llama_adapter.config import LlamaAdapterConfig
from fed_llama.adapter.peft_import import peft_module

NAME = "llama-adapter"


def peft_config(cfg: LlamaAdapterConfig, layers: int) -> Any:
    """peft's AdaptionPromptConfig for ``cfg`` on a model of ``layers`` decoder layers."""
    return peft_module().AdaptionPromptConfig(adapter_len=cfg.prompt_length,
                                         adapter_layers=min(cfg.layers, layers),
                                         task_type="CAUSAL_LM")


def parameter_count(config: Any, cfg: LlamaAdapterConfig) -> int:
    """The module docstring's formula."""
    return min(cfg.layers, config.num_hidden_layers) * (cfg.prompt_length * config.hidden_size
                                                        + 1)


def attach(model: Any, cfg: LlamaAdapterConfig, seed: int) -> Any:
    """``model`` wrapped by peft with freshly initialized adaption prompts (seeded)."""
    torch.manual_seed(seed)
    return peft_module().get_peft_model(model, peft_config(cfg, model.config.num_hidden_layers))
