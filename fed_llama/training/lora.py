"""Attach a trainable LoRA adapter (peft) to a frozen backbone; read and write its weights."""

from __future__ import annotations

from typing import Any

import torch

from fed_llama.adapter.peft_import import bitsandbytes_unless_loaded, peft_module
from fed_llama.common.notices import without_checkpointing_notice
from fed_llama.config.train import LoraConfig


def _peft() -> Any:
    """peft, without importing bitsandbytes (an NF4 backbone's loading has imported it; for
    any other, :func:`bitsandbytes_unless_loaded` keeps peft from importing it)."""
    return peft_module(bitsandbytes=False)


def peft_config(spec: LoraConfig) -> Any:
    """peft's LoraConfig for ``spec``."""
    return _peft().LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                              target_modules=list(spec.modules()), bias="none",
                              task_type="CAUSAL_LM")


def attach_lora(model: Any, spec: LoraConfig, seed: int) -> Any:
    """Wrap ``model`` in a peft model with a freshly initialized adapter (seeded).

    Only the adapter is trainable. On an NF4 backbone the LoRA layers wrap bitsandbytes'
    ``Linear4bit`` (QLoRA); the frozen layers already compute in the configured dtype on CPU,
    so peft's ``prepare_model_for_kbit_training`` (casts and gradient checkpointing, meant for
    GPUs) is not used.
    """
    peft = _peft()
    torch.manual_seed(seed)
    with without_checkpointing_notice(), bitsandbytes_unless_loaded():
        return peft.get_peft_model(model, peft_config(spec))


def named_trainable_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates (the adapter's), by their names in ``model``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates (the adapter's)."""
    return list(named_trainable_parameters(model).values())


def adapter_state(model: Any, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights by peft's saved names (``...lora_A.weight``), as CPU copies."""
    state = _peft().get_peft_model_state_dict(model, adapter_name=adapter)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_adapter_state(model: Any, state: dict[str, torch.Tensor],
                       adapter: str = "default") -> None:
    """Load adapter weights saved by :func:`adapter_state` (names must all match)."""
    result = _peft().set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: unexpected {unexpected[:3]}")


def use_rank(model: Any, spec: LoraConfig, rank: int, seed: int) -> str:
    """Make the adapter of rank ``rank`` the active one (added, seeded, on first use); return
    its name. The global rank ``spec.r`` is peft's ``default`` adapter."""
    import dataclasses

    name = "default" if rank == spec.r else f"rank-{rank}"
    if name not in model.peft_config:
        torch.manual_seed(seed)
        with bitsandbytes_unless_loaded():
            model.add_adapter(name, peft_config(dataclasses.replace(spec, r=rank)))
    model.set_adapter(name)
    return name
