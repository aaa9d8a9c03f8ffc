"""An adapter's state has one digest, which the aggregator signs and the site checks."""

from __future__ import annotations

from pathlib import Path

import torch

from fed_llama.adapter.state import state_bytes, state_digest, state_payload
from fed_llama.crypto import safetensors_manifest

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
