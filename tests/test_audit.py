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


def test_a_checkpoint_that_cannot_be_loaded_is_a_problem_even_with_its_hash_updated(
        tmp_path: Path) -> None:
    from fed_llama.common.files import file_sha256

    out = run_folder(tmp_path)
    folder = out / "rounds" / "round-002"
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    manifest = json.loads((folder / "fed_llama_manifest.json").read_text())
    manifest["files"]["adapter_model.safetensors"] = file_sha256(
        folder / "adapter_model.safetensors")
    (folder / "fed_llama_manifest.json").write_text(json.dumps(manifest))
    problems = audit_run(out, public(out)).problems
    assert any("round 2's checkpoint cannot be loaded" in p for p in problems), problems


@pytest.mark.parametrize(("removed", "found"), [
    (["round-003.json", "round-004.json"], "rounds 3-3 completed without a seal"),
    (["round-001.json", "round-002.json", "round-003.json", "round-004.json"],
     "no round seals, though the run's scenario seals rounds"),
])
def test_seals_removed_from_the_end_or_all_of_them_are_a_problem(
        tmp_path: Path, removed: list[str], found: str) -> None:
    out = run_folder(tmp_path)
    (out / "scenario.toml").write_text("[federation]\nrounds = 3\n")  # seal_rounds by default
    for name in removed:
        (out / "seals" / name).unlink()
    problems = audit_run(out, public(out)).problems
    assert any(found in p for p in problems), problems


def test_no_seals_pass_when_the_scenario_turned_them_off(tmp_path: Path) -> None:
    out = run_folder(tmp_path)
    (out / "scenario.toml").write_text("[security]\nseal_rounds = false\n")
    shutil.rmtree(out / "seals")
    audit = audit_run(out, public(out))
    assert audit.ok and "no round seals (security.seal_rounds is off)" in audit.checked


def test_a_history_row_without_its_checkpoint_and_garbled_files_are_problems_not_errors(
        tmp_path: Path) -> None:
    out = run_folder(tmp_path)
    shutil.rmtree(out / "rounds" / "round-003")
    (out / "seals" / "round-002.json").unlink()
    (out / "seals" / "round-002.json").mkdir()  # not a file
    problems = audit_run(out, public(out)).problems
    assert any("rounds [3] have a history row but no checkpoint" in p for p in problems)
    assert any(p.startswith("round-002.json:") for p in problems), problems
    (out / "history.json").write_text("{not json")
    problems = audit_run(out, public(out)).problems
    assert len(problems) == 1 and "history.json cannot be read" in problems[0]


def test_the_command_names_the_key_it_trusts_and_warns_when_it_lies_in_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_folder(tmp_path)
    shutil.copytree(out / "keys", tmp_path / "trusted")
    assert main(["audit", str(out)]) == 0
    assert "warning  the key is inside the run folder" in capsys.readouterr().out
    assert main(["audit", str(out), "--keys", str(tmp_path / "trusted")]) == 0
    said = capsys.readouterr().out
    assert "fingerprint" in said and "warning" not in said
