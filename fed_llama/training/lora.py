"""Attach a trainable LoRA adapter (peft) to a frozen backbone; read and write its weights."""

from __future__ import annotations

from typing import Any

import torch

from fed_llama.config.train import LoraSpec


def peft_config(spec: LoraSpec) -> Any:
    """peft's LoraConfig for ``spec``."""
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.modules()), bias="none", task_type="CAUSAL_LM")


def attach_lora(model: Any, spec: LoraSpec, seed: int) -> Any:
    """Wrap ``model`` in a peft model with a freshly initialized adapter (seeded).

    Only the adapter is trainable. On an NF4 backbone the LoRA layers wrap bitsandbytes'
    ``Linear4bit`` (QLoRA); the frozen layers already compute in the configured dtype on CPU,
    so peft's ``prepare_model_for_kbit_training`` (casts and gradient checkpointing, meant for
    GPUs) is not used.
    """
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, peft_config(spec))


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates (the adapter's)."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights by peft's saved names (``...lora_A.weight``), as CPU copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by :func:`adapter_state` (names must all match)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: unexpected {unexpected[:3]}")
