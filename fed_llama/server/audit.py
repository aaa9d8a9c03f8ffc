"""An audit of a federation run's folder: is every round there once, intact, and sealed in order?

What :func:`audit_run` checks, from the folder alone and the aggregator's public key:

- **rounds**: every round from 1 to the last completed one has one history row and a checkpoint
  (a round that did not count has a ``failed`` row and no checkpoint, and may be run again); no
  round number has two rows (a round applied twice).
- **checkpoints**: each completed round's files match the hashes in its manifest.
- **seals** (``security.seal_rounds``, read from the folder's ``scenario.toml``):
  ``seals/round-NNN.json`` exist for rounds 1, 2, ... with no gap, one at least for every
  completed round; each is signed by the aggregator's key, names this run and its round, follows the
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
from typing import Any

from fed_llama.adapter.state import State, state_digest
from fed_llama.adapter.store import SEALED_WEIGHTS, read_manifest
from fed_llama.crypto import Refused, RoundSeal, verify_round
from fed_llama.crypto.keys import ServerPublicKey
from fed_llama.errors import FedLlamaError
from fed_llama.server.checkpoint import RunStore, round_of

MAX_SEAL_BYTES = 1 << 16
"""Largest seal file read (a seal is about 300 bytes)."""

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
    checkpoints encrypted at rest. Total on whatever the folder holds: a file that cannot be
    read or parsed is a problem, never an exception."""
    store, audit = RunStore(out), Audit()
    try:
        rows = store.history()
    except FedLlamaError as exc:
        audit.problems.append(str(exc))
        return audit
    counts = Counter(int(r["round"]) for r in rows)
    twice = sorted(r for r, n in counts.items() if n > 1)
    if twice:
        audit.problems.append(f"rounds {twice} have more than one history row (applied twice)")
    recorded = sorted({int(r["round"]) for r in rows if "failed" not in r})
    audit.completed = completed_rounds(store, rows)
    unsaved = sorted(set(recorded) - set(audit.completed))[:10]
    if unsaved:
        audit.problems.append(f"rounds {unsaved} have a history row but no checkpoint (the "
                              "run stopped between the two, or it was removed): resume the "
                              "run to train them again")
    missing = _missing(audit.completed)
    if missing:
        audit.problems.append(f"rounds {missing} have no completed history row and checkpoint "
                              "(lost)")
    elif not unsaved and not twice:
        last = audit.completed[-1] if audit.completed else 0
        audit.checked.append(f"rounds 1-{last} each completed once" if last
                             else "no completed round yet")
    broken = []
    for r in audit.completed:
        try:
            read_manifest(store.round_dir(r), sealed=True)
        except (FedLlamaError, OSError) as exc:
            broken.append(r)
            audit.problems.append(f"round {r}'s checkpoint: {exc}")
    if audit.completed and not broken:
        audit.checked.append(f"{len(audit.completed)} checkpoints match their manifests' hashes")
    _check_seals(store, audit, server, decrypt)
    return audit


def completed_rounds(store: RunStore, rows: list[dict[str, Any]]) -> list[int]:
    """The rounds of ``rows`` (history rows) that counted and have their checkpoint."""
    return sorted({int(r["round"]) for r in rows if "failed" not in r
                   and (store.round_dir(int(r["round"])) / "adapter_config.json").is_file()})


def _missing(completed: list[int], shown: int = 10) -> list[int]:
    """Up to ``shown`` rounds below the last completed one that did not complete (bounded by
    the completed rounds' count, whatever round numbers the history claims)."""
    done, found, k = set(completed), list[int](), 1
    last = completed[-1] if completed else 0
    while k <= last and len(found) < shown:
        if k not in done:
            found.append(k)
        k += 1
    return found


def seals_expected(out: Path) -> bool:
    """Whether the run's scenario (its ``scenario.toml`` in the folder) seals rounds:
    ``security.seal_rounds`` with ``security.envelopes``, their defaults where unset."""
    import tomllib

    from fed_llama.config.security import SecurityConfig

    try:
        security = tomllib.loads((out / "scenario.toml").read_text()).get("security", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True  # unknown: seals missing are then a problem
    if not isinstance(security, dict):
        return True
    defaults = SecurityConfig()
    return bool(security.get("envelopes", defaults.envelopes)) and \
        bool(security.get("seal_rounds", defaults.seal_rounds))


def _check_seals(store: RunStore, audit: Audit, server: ServerPublicKey | None,
                 decrypt: Decrypt | None) -> None:
    seals = sorted((round_of(p.name), p) for p in (store.out / "seals").glob("round-*.json"))
    last = audit.completed[-1] if audit.completed else 0
    if not seals:
        if seals_expected(store.out) and last:
            audit.problems.append("no round seals, though the run's scenario seals rounds "
                                  "(security.seal_rounds): seals/ was removed")
        else:
            audit.checked.append("no round seals (security.seal_rounds is off)")
        return
    if server is None:
        audit.problems.append(f"{len(seals)} round seals not checked: give the aggregator's "
                              "public key (server.pub.json)")
        return
    if not (store.out / "run-id").is_file():
        audit.problems.append(f"{len(seals)} round seals but no run-id file to check them "
                              "against: restore it from a backup")
        return
    try:
        run = store.run_id()
    except FedLlamaError as exc:
        audit.problems.append(str(exc))
        return
    prev, compared = None, 0
    for k, (number, path) in enumerate(seals, start=1):
        if number != k:
            audit.problems.append(f"the seal chain has a gap before {path.name}")
            return
        try:
            if path.stat().st_size > MAX_SEAL_BYTES or not path.is_file():
                raise Refused("bad-seal", "not a seal file (a folder, or larger than a seal)")
            seal = RoundSeal.parse(path.read_bytes())
            if k > 1 and (k - 1) in audit.completed:
                checkpoint = _checkpoint_digest(store, k - 1, decrypt)
                if checkpoint is not None:
                    compared += 1
                    if checkpoint != seal.adapter_sha256:
                        audit.unsealed_checkpoints.append(k)
            elif k > 1:
                audit.problems.append(f"{path.name}: round {k - 1} has no completed checkpoint "
                                      "for it to seal")
            verify_round(seal, server, run=run, server_round=k,
                         adapter_sha256=seal.adapter_sha256,
                         prev_digest=prev.digest if prev else "0" * 64)
        except (Refused, OSError) as exc:
            audit.problems.append(f"{path.name}: {exc}")
            return
        except Unloadable as exc:
            audit.problems.append(str(exc))
            return
        prev = seal
        audit.seals += 1
    if audit.unsealed_checkpoints:
        audit.problems.append(f"the seals of rounds {audit.unsealed_checkpoints} do not seal "
                              "the checkpoint of the round before")
    if len(seals) < last:  # round k is sealed as it is sent: every completed round has one
        audit.problems.append(f"rounds {len(seals) + 1}-{last} completed without a seal "
                              "(seal files removed)")
    audit.checked.append(f"{audit.seals} round seals verify: signed by the aggregator, for "
                         f"run {run}, each following the one before")
    expected = sum(1 for k in range(2, len(seals) + 1) if (k - 1) in audit.completed)
    if compared:
        audit.checked.append(f"{compared} of them seal the checkpoint of the round before")
    elif expected:
        audit.checked.append("checkpoints encrypted at rest: not compared with the seals "
                             "(needs the aggregator's private key)")
    if last and last == len(seals):
        audit.checked.append(f"round {last}'s checkpoint (the run's last) is sealed when the "
                             "next round starts")


class Unloadable(FedLlamaError):
    """A completed round's checkpoint whose weights cannot be loaded."""


def _checkpoint_digest(store: RunStore, server_round: int, decrypt: Decrypt | None
                       ) -> str | None:
    """The digest a seal signs of round ``server_round``'s checkpoint (None: encrypted at
    rest and no ``decrypt``); :class:`Unloadable` when its weights cannot be loaded."""
    folder = store.round_dir(server_round)
    if (folder / SEALED_WEIGHTS).is_file() and decrypt is None:
        return None
    try:
        state: State = store.load_round(server_round, decrypt)
    except Exception as exc:  # whatever the bytes are: a problem named, not a traceback
        raise Unloadable(f"round {server_round}'s checkpoint cannot be loaded: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None
    return state_digest(state)
