"""Round checkpoints encrypted at rest to the aggregator's own key (encrypt_checkpoints)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from fed_llama.adapter.store import SEALED_WEIGHTS, read_manifest
from fed_llama.cli.main import main
from fed_llama.crypto import Refused
from fed_llama.crypto.at_rest import decrypt_at_rest, encrypt_at_rest
from fed_llama.crypto.keyring import KeyFolder
from fed_llama.crypto.keys import ServerKey
from fed_llama.errors import AdapterError, ConfigError
from fed_llama.server.checkpoint import RunStore

STATE = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 16),
         "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(16, 4)}
PEFT = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])


def stores(tmp_path: Path) -> tuple[RunStore, ServerKey, KeyFolder]:
    folder = KeyFolder(tmp_path / "keys")
    key = folder.init_server("x25519")
    store = RunStore(tmp_path / "run")
    store.start("scenario", resume=False)
    public = key.public()
    for r in (1, 2):
        store.save_round(r, {k: v * r for k, v in STATE.items()}, PEFT, {"kind": "global"},
                         encrypt=lambda data, label: encrypt_at_rest(public, data, label))
    return store, key, folder


def test_a_checkpoint_holds_no_plain_weights_and_reloads_with_the_key(tmp_path: Path) -> None:
    store, key, _ = stores(tmp_path)
    folder = store.round_dir(2)
    assert not (folder / "adapter_model.safetensors").exists()
    sealed = (folder / SEALED_WEIGHTS).read_bytes()
    assert STATE["base_model.model.layers.0.q_proj.lora_A.weight"].numpy().tobytes()[:64] \
        not in sealed
    loaded = store.load_round(2, lambda blob, label: decrypt_at_rest(key, blob, label))
    for name, value in STATE.items():
        assert torch.equal(loaded[name], value * 2)
    # without the key it is refused with how to decrypt it, not misread
    with pytest.raises(AdapterError, match=r"encrypted at rest .* fed-llama keys "
                                           r"decrypt-checkpoint"):
        store.load_round(2)


def test_a_checkpoint_moved_to_another_round_or_key_does_not_decrypt(tmp_path: Path) -> None:
    store, key, _ = stores(tmp_path)
    blob = (store.round_dir(2) / SEALED_WEIGHTS).read_bytes()
    with pytest.raises(Refused) as err:
        decrypt_at_rest(key, blob, store.checkpoint_label(1))
    assert err.value.reason == "decrypt-failed"
    with pytest.raises(Refused, match="decrypt-failed"):
        decrypt_at_rest(ServerKey.generate(), blob, store.checkpoint_label(2))
    with pytest.raises(Refused) as err:
        decrypt_at_rest(key, b"PK\x03\x04 not ours", store.checkpoint_label(2))
    assert err.value.reason == "malformed"
    # swapping the files of two rounds breaks the manifest's hashes first
    shutil.copy(store.round_dir(2) / SEALED_WEIGHTS, store.round_dir(1) / SEALED_WEIGHTS)
    with pytest.raises(AdapterError, match="does not match the sha256"):
        store.load_round(1, lambda b, label: decrypt_at_rest(key, b, label))


def test_decrypt_checkpoint_writes_a_plain_peft_folder(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from safetensors.torch import load_file

    store, _, folder = stores(tmp_path)
    out = tmp_path / "plain"
    assert main(["keys", "decrypt-checkpoint", str(store.round_dir(1)), "--dir",
                 str(folder.root), "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["round"] == 1 and "encrypted_at_rest" not in manifest
    plain = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(plain[k], v) for k, v in STATE.items())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    # the plain copy is never written over without --force, and a plain folder is refused
    assert main(["keys", "decrypt-checkpoint", str(store.round_dir(1)), "--dir",
                 str(folder.root), "--out", str(out)]) == 2
    assert main(["keys", "decrypt-checkpoint", str(out), "--dir", str(folder.root), "--out",
                 str(tmp_path / "again")]) == 2
    assert "is not encrypted at rest" in capsys.readouterr().err


def test_the_server_optimizer_state_is_encrypted_bound_to_its_round_and_pruned_on_resume(
        tmp_path: Path) -> None:
    import numpy as np

    store, key, _ = stores(tmp_path)
    public = key.public()
    state = {f"m_t/{k}": v.numpy() for k, v in STATE.items()}
    for r in (1, 2):
        store.save_optimizer(r, state, lambda data, label: encrypt_at_rest(public, data, label))

    def decrypt(blob: bytes, label: str) -> bytes:
        return decrypt_at_rest(key, blob, label)

    loaded = store.load_optimizer(1, decrypt)
    assert loaded is not None and all(np.array_equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(ConfigError, match="encrypted: resume with the aggregator's key"):
        store.load_optimizer(1)
    # round 2's state moved into round 1's place does not decrypt
    sealed = store.optimizer_dir / "round-001.safetensors.hpke"
    shutil.copy(store.optimizer_dir / "round-002.safetensors.hpke", sealed)
    with pytest.raises(Refused):
        store.load_optimizer(1, decrypt)
    # only round 1 completed: --resume drops what round 2 left behind
    store.record({"round": 1, "pooled-perplexity": 2.0})
    assert store.start("scenario", resume=True) == 1
    assert sorted(p.name for p in store.optimizer_dir.iterdir()) == [
        "round-001.safetensors.hpke"]
    assert not store.round_dir(2).exists()
