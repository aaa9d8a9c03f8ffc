"""An adapter's state has one digest, which the aggregator signs and the site checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_llama.adapter.state import state_bytes, state_digest, state_payload
from fed_llama.crypto import Refused, safetensors_manifest

ROOT = Path(__file__).resolve().parents[1] / "fed_llama"
A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


def lora_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A: torch.randn(4, 16, generator=g), B: torch.randn(16, 4, generator=g)}


def test_the_digest_ignores_order_and_memory_layout_but_not_values() -> None:
    state = lora_state()
    reordered = {B: state[B].t().contiguous().t(), A: state[A]}  # other order, strided B
    assert not reordered[B].is_contiguous()
    assert state_digest(reordered) == state_digest(state)
    changed = dict(state, **{B: state[B].clone()})
    changed[B][0, 0] += 1e-6
    assert state_digest(changed) != state_digest(state)


def test_the_payload_is_the_safetensors_of_the_state_and_its_size_is_counted() -> None:
    state = lora_state()
    names = [t.name for t in safetensors_manifest(state_payload(state))]
    assert names == sorted(state)
    assert state_bytes(state) == (4 * 16 + 16 * 4) * 4


def test_only_one_module_computes_a_state_digest() -> None:
    """The aggregator (server/security.py) and the site (client/security.py) both call
    adapter/state.py; nothing else digests a manifest of adapter tensors."""
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                   if "manifest_digest(" in p.read_text())
    assert users == ["adapter/state.py", "crypto/seal.py"]
    for side in ("server/security.py", "client/security.py"):
        assert "state_digest(" in (ROOT / side).read_text()


def _method_states() -> dict[str, dict[str, torch.Tensor]]:
    """Each method's trainable state on a tiny LLaMA (LoRA through peft, the others through
    their own attach)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fed_llama.adapter.methods import METHODS, method_of
    from fed_llama.adapter.methods.own_format import trainable_state
    from fed_llama.config.train import LoraConfig
    from fed_llama.training.lora import adapter_state, attach_lora

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    states = {}
    for name in METHODS:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if name == "lora":
            states[name] = adapter_state(attach_lora(model, LoraConfig(r=4), seed=0))
        else:
            spec = method_of(name)
            states[name] = trainable_state(spec.attach(model, spec.config_type(), 0))
    return states


def test_the_aggregators_seal_verifies_at_the_site_for_every_methods_state(
        tmp_path: Path) -> None:
    """The aggregator seals each method's state (server/security.py) and the site checks the
    seal against the state it received (client/security.py): one digest for all methods."""
    import dataclasses

    from fed_llama.client.security import check_round
    from fed_llama.config.security import SecurityConfig
    from fed_llama.crypto import ServerKey, TrustStore
    from fed_llama.server.security import ServerGuard

    key = ServerKey.generate()
    cfg = SecurityConfig()
    for name, state in _method_states().items():
        run = f"run-digest-{name}"  # the site remembers each run's last seal: a run of its own
        guard = ServerGuard(cfg, key, TrustStore(), run, tmp_path / name)
        config = guard.round_config(1, state)
        assert check_round(cfg, key.public(), config, state, 1) == run, name
        changed = dict(state)
        first = next(iter(changed))
        changed[first] = changed[first] + 1.0
        with pytest.raises(Refused, match="not the one the aggregator sealed"):
            check_round(dataclasses.replace(cfg), key.public(), config, changed, 1)
