"""LLaMA-Adapter V2 on a frozen ``LlamaForCausalLM``: attach, state, count, fold.

Trainable, and nothing else (``prompt_layers`` = N top layers, ``L`` = ``prompt_length``,
``H`` = hidden size, ``h`` = attention heads, ``out(m)`` = a target projection's outputs,
``layers`` = all decoder layers)::

    count = layers · Σ_m 2·out(m)                  bias and scale of each target projection
          + (2·layers + 1) · H                       every RMSNorm weight (train_norms)
          + N · (L·H + h)                            prompts and per-head gates (prompts)

On SmolLM2-135M with the defaults (7 projections, 30 layers, L = 10): 311,040 + 35,136 +
173,070 = 519,246 parameters (0.39% of the backbone). The gate is per head and goes through
tanh (the paper's official code); peft's V1 uses one scalar per layer without tanh.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fed_llama.adapter.methods.attention import AdaptedAttention
from fed_llama.adapter.methods.llama_adapter_v2.config import LlamaAdapterV2Config
from fed_llama.adapter.methods.llama_adapter_v2.layers import (
    BIAS,
    SCALE,
    add_bias_and_scale,
    fold_bias_and_scale,
)

NAME = "llama-adapter-v2"
_NORMS = ("input_layernorm", "post_attention_layernorm")


def _out_features(config: Any, module: str) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"q_proj": config.num_attention_heads * head_dim,
            "k_proj": config.num_key_value_heads * head_dim,
            "v_proj": config.num_key_value_heads * head_dim,
            "o_proj": config.hidden_size, "gate_proj": config.intermediate_size,
            "up_proj": config.intermediate_size, "down_proj": config.hidden_size}[module]


def _projection(layer: Any, module: str) -> Any:
    return getattr(layer.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj")
                   else layer.mlp, module)


def parameter_count(config: Any, cfg: LlamaAdapterV2Config) -> int:
    """The module docstring's formula."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    count = layers * sum(2 * _out_features(config, m) for m in cfg.target_modules)
    if cfg.train_norms:
        count += (2 * layers + 1) * hidden
    if cfg.prompts:
        count += min(cfg.prompt_layers, layers) * (cfg.prompt_length * hidden
                                                   + config.num_attention_heads)
    return count


def attach(model: Any, cfg: LlamaAdapterV2Config, seed: int) -> Any:
    """Freeze ``model`` (a LlamaForCausalLM) and add V2's parameters in place; return it."""
    config = model.config
    for param in model.parameters():
        param.requires_grad_(False)
    layers = model.model.layers
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(layers):
        for module in cfg.target_modules:
            add_bias_and_scale(_projection(layer, module), _out_features(config, module))
        if cfg.prompts and index >= len(layers) - min(cfg.prompt_layers, len(layers)):
            AdaptedAttention.adapt(layer.self_attn).add_prompts(
                cfg.prompt_length, config.hidden_size, generator)
        if cfg.train_norms:
            for norm in _NORMS:
                getattr(layer, norm).weight.requires_grad_(True)
    if cfg.train_norms:
        model.model.norm.weight.requires_grad_(True)
    for name, param in model.named_parameters():
        if name.endswith((f".{BIAS}", f".{SCALE}", ".adaption_prompt", ".adaption_gate")):
            param.requires_grad_(True)
    return model


def fold(model: Any, cfg: LlamaAdapterV2Config) -> Any:
    """A new fp32 ``LlamaForCausalLM`` that computes what the adapted ``model`` computes:
    biases and scales folded into the projections (``attention_bias = mlp_bias = true``),
    trained norms in place; prompts, which cannot fold, re-attached as they are."""
    from transformers import LlamaForCausalLM

    if any(p.dtype == torch.uint8 for p in model.parameters()):
        raise ValueError("fold needs a dense backbone: load it with quantization = 'none' and "
                         "the adapter's weights, then fold (an NF4 backbone cannot be folded)")
    config = copy.deepcopy(model.config)
    config.attention_bias = config.mlp_bias = True
    folded = LlamaForCausalLM(config).float().eval()
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith((f".{BIAS}", f".{SCALE}", ".adaption_prompt", ".adaption_gate"))}
    missing = folded.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"cannot fold: unexpected {missing.unexpected_keys[:2]}")
    for source, target in zip(model.model.layers, folded.model.layers, strict=True):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"):
            src, dst = _projection(source, module), _projection(target, module)
            with torch.no_grad():
                if hasattr(src, SCALE):
                    weight, bias = fold_bias_and_scale(src.weight, src.bias,
                                                       getattr(src, BIAS), getattr(src, SCALE))
                    dst.weight.copy_(weight)
                    dst.bias.copy_(bias)
                else:
                    dst.bias.zero_() if src.bias is None else dst.bias.copy_(src.bias.float())
        attn = source.self_attn
        if isinstance(attn, AdaptedAttention) and attn.adaption_prompt is not None:
            new = AdaptedAttention.adapt(target.self_attn)
            new.add_prompts(attn.adaption_prompt.shape[1], config.hidden_size,
                            torch.Generator())
            with torch.no_grad():
                assert new.adaption_prompt is not None and new.adaption_gate is not None
                assert attn.adaption_gate is not None
                new.adaption_prompt.copy_(attn.adaption_prompt.float())
                new.adaption_gate.copy_(attn.adaption_gate.float())
    for param in folded.parameters():
        param.requires_grad_(False)
    return folded
