"""The survey's other adapters on a frozen LLaMA: LLaMA-Adapter V1 (peft), V2 and Excitor.

For each: the output at initialization is exactly the frozen backbone's; only the method's
parameters train, and there are as many as its docstring's formula says; the KV cache gives
the same logits as a full pass; a saved folder reloads to the same logits (V1 with plain peft,
V2 and Excitor with our loader); V2's bias, scale and norms fold into a plain LlamaForCausalLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fed_llama.adapter.methods import METHODS, method_of
from fed_llama.adapter.methods.excitor.config import ExcitorConfig
from fed_llama.adapter.methods.llama_adapter.config import LlamaAdapterConfig
from fed_llama.adapter.methods.llama_adapter_v2 import model as v2
from fed_llama.adapter.methods.llama_adapter_v2.config import LlamaAdapterV2Config
from fed_llama.adapter.methods.own_format import (
    load_into,
    load_trainable_state,
    save,
    trainable_state,
)
from fed_llama.errors import AdapterError

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, tie_word_embeddings=True)
CASES: dict[str, Any] = {
    "llama-adapter": LlamaAdapterConfig(prompt_length=5, layers=2),
    "llama-adapter-v2": LlamaAdapterV2Config(prompt_length=5, prompt_layers=2),
    "llama-adapter-v2 bias-scale-norm": LlamaAdapterV2Config(prompts=False),
    "excitor": ExcitorConfig(prompt_length=5, layers=2, rank=4),
}
IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


def backbone() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def attached(case: str) -> Any:
    cfg = CASES[case]
    return method_of(case.split()[0]).attach(backbone(), cfg, 0), cfg


def perturb(model: Any, scale: float = 0.2) -> None:
    """Move every trainable tensor away from its initialization (as training would)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_method_is_registered() -> None:
    assert set(METHODS) == {"lora", *(c.split()[0] for c in CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_at_initialization_the_logits_are_the_frozen_backbones_exactly(case: str) -> None:
    model, _ = attached(case)
    assert torch.equal(logits(model), logits(backbone()))


@pytest.mark.parametrize("case", list(CASES))
def test_only_the_methods_parameters_train_and_the_formula_counts_them(case: str) -> None:
    model, cfg = attached(case)
    spec = method_of(case.split()[0])
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == spec.parameter_count(CONFIG, cfg)
    frozen = set(dict(backbone().named_parameters()))
    if case.startswith("llama-adapter-v2"):  # the norms train; nothing else of the backbone
        assert {n for n in trainable if n in frozen} == {n for n in frozen if "norm" in n}
    else:
        assert not {n.replace(".model.", ".", 1) for n in trainable} & frozen
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("name", "cfg", "count"), [
    ("llama-adapter", LlamaAdapterConfig(), 172_830),
    ("llama-adapter-v2", LlamaAdapterV2Config(), 519_246),
    ("llama-adapter-v2", LlamaAdapterV2Config(prompts=False), 346_176),
    ("excitor", ExcitorConfig(), 1_094_490),
])
def test_the_default_backbones_counts(name: str, cfg: Any, count: int) -> None:
    """SmolLM2-135M's shape, built on the meta device (no weights)."""
    spec = method_of(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(SMOLLM2)
    model = spec.attach(model, cfg, 0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    assert spec.parameter_count(SMOLLM2, cfg) == count


@pytest.mark.parametrize("case", list(CASES))
def test_the_kv_cache_gives_the_full_pass_logits(case: str) -> None:
    model, _ = attached(case)
    perturb(model)
    full = logits(model)[:, -1]
    with torch.no_grad():
        first = model(input_ids=IDS[:, :-1], use_cache=True)
        step = model(input_ids=IDS[:, -1:], past_key_values=first.past_key_values,
                     use_cache=True).logits[:, -1]
    assert (full - logits(backbone())[:, -1]).abs().max() > 1e-4  # the method does something
    assert torch.allclose(step, full, atol=1e-5)


@pytest.mark.parametrize("prompts", [False, True])
def test_v2_bias_scale_and_norms_fold_into_the_backbone(prompts: bool) -> None:
    cfg = LlamaAdapterV2Config(prompts=prompts, prompt_length=5, prompt_layers=2)
    model = v2.attach(backbone(), cfg, 0)
    perturb(model)
    folded = v2.fold(model, cfg)
    assert type(folded) is LlamaForCausalLM
    assert folded.config.attention_bias and folded.config.mlp_bias
    assert torch.allclose(logits(folded), logits(model), atol=1e-5)
    adapted = [n for n, _ in folded.named_parameters() if "adaption" in n]
    assert bool(adapted) == prompts  # prompts cannot fold: they stay as they are


@pytest.mark.parametrize("case", ["llama-adapter-v2", "llama-adapter-v2 bias-scale-norm",
                                  "excitor"])
def test_our_methods_save_and_reload_with_the_documented_loader(tmp_path: Path,
                                                                case: str) -> None:
    model, cfg = attached(case)
    perturb(model)
    save(model, case.split()[0], cfg, tmp_path / "adapter", {"kind": "adapter"})
    reloaded = load_into(backbone(), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), logits(model))


def test_v1_saves_a_folder_plain_peft_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    model, _ = attached("llama-adapter")
    perturb(model)
    model.save_pretrained(str(tmp_path / "v1"))
    reloaded = PeftModel.from_pretrained(backbone(), str(tmp_path / "v1"))
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-6)


def test_a_state_of_other_settings_is_refused_with_its_reason() -> None:
    model, _ = attached("excitor")
    state = trainable_state(model)
    name = next(iter(state))
    with pytest.raises(AdapterError, match="do not fit this model: missing"):
        load_trainable_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(AdapterError, match="has shape"):
        load_trainable_state(model, dict(state, **{name: torch.zeros(1)}))
