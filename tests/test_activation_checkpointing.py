"""``train.activation_checkpointing``: the decoder layers' activations are recomputed in the
backward pass instead of kept, and the gradients are the same as without it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fed_llama.adapter.methods import method_of
from fed_llama.adapter.methods.excitor.config import ExcitorConfig
from fed_llama.config.adapter import LoraConfig
from fed_llama.data.tokenize import IGNORE
from fed_llama.training.loop import checkpoint_activations
from fed_llama.training.lora import attach_lora
from fed_llama.training.loss import answer_nll

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def attached(method: str) -> Any:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    if method == "lora":
        return attach_lora(model, LoraConfig(dropout=0.0), seed=0)
    return method_of(method).attach(model, ExcitorConfig(layers=2, prompt_length=4), 0)


def gradients(model: Any) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :6] = IGNORE  # the question: no loss
    model.train()
    with torch.no_grad():  # move the zero-initialized parts, so every gradient is non-zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    nll, _ = answer_nll(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                "labels": labels})
    nll.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "excitor"])
def test_checkpointed_gradients_equal_the_plain_ones(method: str) -> None:
    plain = gradients(attached(method))
    model = attached(method)
    checkpoint_activations(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    calls = []
    for layer in base.model.layers:  # count the recomputing calls of each layer
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = (
            lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k))
    again = gradients(model)
    assert len(calls) == CONFIG.num_hidden_layers  # each layer ran checkpointed
    assert set(again) == set(plain) and plain
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(again[name], grad, atol=1e-6), name
