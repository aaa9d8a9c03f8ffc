"""``fed-llama audit``: a run folder passes only when every round is there once, its checkpoint
is intact, and the round seals are the aggregator's, in order, each sealing the global adapter
the sites were sent (the checkpoint of the round before)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from fed_llama.adapter.state import state_digest
from fed_llama.cli.main import main
from fed_llama.crypto import seal_round
from fed_llama.crypto.at_rest import checkpoint_ciphers
from fed_llama.crypto.keyring import KeyFolder
from fed_llama.server.audit import audit_run
from fed_llama.server.checkpoint import RunStore

A = "base_model.model.layers.0.q_proj.lora_A.weight"
START = {A: torch.arange(64, dtype=torch.float32).view(4, 16) / 64}
PEFT = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])


def run_folder(tmp_path: Path, rounds: int = 3, *, encrypt: bool = False) -> Path:
    """A run as the ServerApp writes it: round k is sent (and sealed) with round k-1's
    checkpoint, trained, checkpointed and recorded; round ``rounds + 1`` has been sent."""
    store = RunStore(tmp_path / "run")
    store.start("scenario", resume=False)
    key = KeyFolder(tmp_path / "run" / "keys").init_server("x25519")
    cipher = checkpoint_ciphers(key)[0] if encrypt else None
    state, prev = START, None
    for k in range(1, rounds + 2):
        prev = seal_round(key, run=store.run_id(), server_round=k,
                          adapter_sha256=state_digest(state), prev=prev)
        (store.out / "seals").mkdir(exist_ok=True)
        (store.out / "seals" / f"round-{k:03d}.json").write_text(json.dumps(prev.to_json()))
        if k > rounds:
            break
        state = {A: state[A] + k}
        store.save_round(k, state, PEFT, {"kind": "global"}, encrypt=cipher)
        store.record({"round": k, "sites-trained": 3.0})
    return store.out


def public(out: Path):  # type: ignore[no-untyped-def]
    from fed_llama.crypto.keys import ServerPublicKey

    return ServerPublicKey.load(out / "keys" / "server.pub.json")


def test_an_untouched_run_passes_with_every_seal_compared_to_its_checkpoint(
        tmp_path: Path) -> None:
    out = run_folder(tmp_path)
    audit = audit_run(out, public(out))
    assert audit.ok, audit.problems
    assert audit.completed == [1, 2, 3]
    assert audit.seals == 4  # round 4 was sent with round 3's checkpoint
    assert "3 of them seal the checkpoint of the round before" in audit.checked


def test_a_checkpoint_changed_after_its_round_is_refused_by_its_manifest(
        tmp_path: Path) -> None:
    out = run_folder(tmp_path)
    weights = out / "rounds" / "round-002" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    audit = audit_run(out, public(out))
    assert not audit.ok
    assert any(p.startswith("round 2's checkpoint:") for p in audit.problems), audit.problems


def test_a_round_trained_on_a_state_it_had_already_changed_breaks_the_chain(
        tmp_path: Path) -> None:
    # round 2 applied twice: its checkpoint is not what round 3 was sent (and sealed)
    out = run_folder(tmp_path)
    store = RunStore(out)
    store.save_round(2, {A: START[A] + 99}, PEFT, {"kind": "global"})
    audit = audit_run(out, public(out))
    assert audit.unsealed_checkpoints == [3]
    assert "the seals of rounds [3] do not seal the checkpoint of the round before" in \
        audit.problems


@pytest.mark.parametrize(("tamper", "found"), [
    (lambda s: shutil.copy(s / "round-001.json", s / "round-002.json"), "round-002.json"),
    (lambda s: (s / "round-002.json").unlink(), "gap before round-003.json"),
    (lambda s: (s / "round-003.json").write_text("{not json"), "round-003.json"),
])
def test_a_swapped_missing_or_garbled_seal_is_named(tmp_path: Path, tamper, found: str
                                                    ) -> None:  # type: ignore[no-untyped-def]
    out = run_folder(tmp_path)
    tamper(out / "seals")
    audit = audit_run(out, public(out))
    assert not audit.ok
    assert any(found in p for p in audit.problems), audit.problems


def test_seals_signed_by_another_key_are_refused(tmp_path: Path) -> None:
    out = run_folder(tmp_path)
    other = KeyFolder(tmp_path / "other").init_server("x25519").public()
    audit = audit_run(out, other)
    assert not audit.ok and "round-001.json" in audit.problems[0]


def test_a_lost_round_and_a_round_recorded_twice_are_problems(tmp_path: Path) -> None:
    out = run_folder(tmp_path)
    rows = json.loads((out / "history.json").read_text())
    (out / "history.json").write_text(json.dumps([*rows, rows[0]]))
    shutil.rmtree(out / "rounds" / "round-002")
    problems = audit_run(out, public(out)).problems
    assert "rounds [1] have more than one history row (applied twice)" in problems
    assert "rounds [2] have no completed history row and checkpoint (lost)" in problems


def test_encrypted_checkpoints_are_compared_with_the_private_key_only(tmp_path: Path) -> None:
    out = run_folder(tmp_path, encrypt=True)
    without = audit_run(out, public(out))
    assert without.ok and any("not compared" in c for c in without.checked)
    from fed_llama.crypto.keys import ServerKey

    key = ServerKey.load(out / "keys" / "server.key")
    audit = audit_run(out, public(out), checkpoint_ciphers(key)[1])
    assert audit.ok and "3 of them seal the checkpoint of the round before" in audit.checked


def test_the_command_prints_each_check_and_exits_1_on_a_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_folder(tmp_path, encrypt=True)
    assert main(["audit", str(out)]) == 0
    said = capsys.readouterr().out
    assert "PASS: 3 completed round(s), 4 seal(s) verified, 0 problem(s)" in said
    assert "3 of them seal the checkpoint" in said  # decrypted with RUN/keys/server.key
    (out / "seals" / "round-002.json").unlink()
    assert main(["audit", str(out)]) == 1
    assert "PROBLEM  the seal chain has a gap before round-003.json" in capsys.readouterr().out
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    assert "is not a federation run's folder" in capsys.readouterr().err
