"""An audit of a federation run's folder: is every round there once, intact, and sealed in order?

What :func:`audit_run` checks, from the folder alone and the aggregator's public key:

- **rounds**: every round from 1 to the last completed one has one history row and a checkpoint
  (a round that did not count has a ``failed`` row and no checkpoint, and may be run again); no
  round number has two rows (a round applied twice).
- **checkpoints**: each completed round's files match the hashes in its manifest.
- **seals** (``security.seal_rounds``): ``seals/round-NNN.json`` exist for rounds 1, 2, ... with
  no gap; each is signed by the aggregator's key, names this run and its round, follows the
  previous seal, and seals the global adapter the sites were sent that round: the checkpoint of
  the round before it (round 1's, the starting adapter, has no checkpoint to compare). With
  checkpoints encrypted at rest that comparison needs the aggregator's private key (``key``).

The run's last checkpoint is sealed only when the next round starts: the audit says so rather
than counting it as unsealed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fed_llama.adapter.state import State, state_digest
from fed_llama.adapter.store import SEALED_WEIGHTS, read_manifest
from fed_llama.crypto import Refused, RoundSeal, verify_round
from fed_llama.crypto.keys import ServerPublicKey
from fed_llama.errors import FedLlamaError
from fed_llama.server.checkpoint import RunStore

Decrypt = Callable[[bytes, str], bytes]
"""Decrypts a checkpoint encrypted at rest (``checkpoint_ciphers(key)[1]``, from
:mod:`fed_llama.crypto.at_rest`)."""


@dataclass
class Audit:
    """What an audit found: what verified (``checked``) and what did not (``problems``)."""

    completed: list[int] = field(default_factory=list)
    """The rounds with a history row that did not fail and a checkpoint."""
    seals: int = 0
    """Round seals that verified."""
    checked: list[str] = field(default_factory=list)
    """One line per check that passed."""
    problems: list[str] = field(default_factory=list)
    """One line per problem, naming the round or file."""
    unsealed_checkpoints: list[int] = field(default_factory=list)
    """Rounds whose seal does not seal the checkpoint of the round before (applied on a state
    the round had already changed, or a checkpoint changed after the fact)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_run(out: Path, server: ServerPublicKey | None, decrypt: Decrypt | None = None
              ) -> Audit:
    """Audit the run folder ``out`` (see the module docstring). ``server``: the aggregator's
    public key (None: the seals are not checked, and the audit says so); ``decrypt``: for
    checkpoints encrypted at rest."""
    store, audit = RunStore(out), Audit()
    rows = store.history()
    counts = Counter(int(r["round"]) for r in rows)
    twice = sorted(r for r, n in counts.items() if n > 1)
    if twice:
        audit.problems.append(f"rounds {twice} have more than one history row (applied twice)")
    audit.completed = sorted(
        {int(r["round"]) for r in rows if "failed" not in r
         and (store.round_dir(int(r["round"])) / "adapter_config.json").is_file()})
    last = audit.completed[-1] if audit.completed else 0
    missing = sorted(set(range(1, last + 1)) - set(audit.completed))
    if missing:
        audit.problems.append(f"rounds {missing} have no completed history row and checkpoint "
                              "(lost)")
    else:
        audit.checked.append(f"rounds 1-{last} each completed once" if last
                             else "no completed round yet")
    broken = []
    for r in audit.completed:
        try:
            read_manifest(store.round_dir(r), sealed=True)
        except FedLlamaError as exc:
            broken.append(r)
            audit.problems.append(f"round {r}'s checkpoint: {exc}")
    if audit.completed and not broken:
        audit.checked.append(f"{len(audit.completed)} checkpoints match their manifests' hashes")
    _check_seals(store, audit, server, decrypt)
    return audit


def _check_seals(store: RunStore, audit: Audit, server: ServerPublicKey | None,
                 decrypt: Decrypt | None) -> None:
    seals = sorted((store.out / "seals").glob("round-*.json"))
    if not seals:
        audit.checked.append("no round seals (security.seal_rounds was off)")
        return
    if server is None:
        audit.problems.append(f"{len(seals)} round seals not checked: give the aggregator's "
                              "public key (server.pub.json)")
        return
    if not (store.out / "run-id").is_file():
        audit.problems.append(f"{len(seals)} round seals but no run-id file to check them "
                              "against: restore it from a backup")
        return
    run, prev, compared = store.run_id(), None, 0
    for k, path in enumerate(seals, start=1):
        if path.name != f"round-{k:03d}.json":
            audit.problems.append(f"the seal chain has a gap before {path.name}")
            return
        try:
            seal = RoundSeal.parse(path.read_bytes())
            sent = seal.adapter_sha256
            if k > 1 and (k - 1) in audit.completed:
                checkpoint = _checkpoint_digest(store, k - 1, decrypt)
                if checkpoint is not None:
                    compared += 1
                    if checkpoint != seal.adapter_sha256:
                        audit.unsealed_checkpoints.append(k)
            elif k > 1:
                audit.problems.append(f"{path.name}: round {k - 1} has no completed checkpoint "
                                      "for it to seal")
            verify_round(seal, server, run=run, server_round=k, adapter_sha256=sent,
                         prev_digest=prev.digest if prev else "0" * 64)
        except Refused as exc:
            audit.problems.append(f"{path.name}: {exc}")
            return
        prev = seal
        audit.seals += 1
    if audit.unsealed_checkpoints:
        audit.problems.append(f"the seals of rounds {audit.unsealed_checkpoints} do not seal "
                              "the checkpoint of the round before")
    audit.checked.append(f"{audit.seals} round seals verify: signed by the aggregator, for "
                         f"run {run}, each following the one before")
    expected = sum(1 for k in range(2, len(seals) + 1) if (k - 1) in audit.completed)
    if compared:
        audit.checked.append(f"{compared} of them seal the checkpoint of the round before")
    elif expected:
        audit.checked.append("checkpoints encrypted at rest: not compared with the seals "
                             "(needs the aggregator's private key)")
    if audit.completed and audit.completed[-1] >= len(seals):
        audit.checked.append(f"round {audit.completed[-1]}'s checkpoint (the run's last) is "
                             "sealed when the next round starts")


def _checkpoint_digest(store: RunStore, server_round: int, decrypt: Decrypt | None
                       ) -> str | None:
    """The digest a seal signs of round ``server_round``'s checkpoint (None: encrypted at
    rest and no ``decrypt``, or unreadable: the manifest check has said why)."""
    folder = store.round_dir(server_round)
    if (folder / SEALED_WEIGHTS).is_file() and decrypt is None:
        return None
    try:
        state: State = store.load_round(server_round, decrypt)
    except Exception:  # unreadable in any way: the manifest check has said why
        return None
    return state_digest(state)
