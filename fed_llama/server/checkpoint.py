"""A federation run's folder: a global adapter per round, the metrics history, the resume point.

Layout of ``--out``::

    scenario.toml                the scenario as run (resume refuses a different one)
    run-id                       the id update envelopes are bound to
    keys/                        a simulation's keys, when the scenario names none
    seals/round-NNN.json         the aggregator's signed, hash-chained seal of each round
    optimizer/round-NNN.safetensors
                                 the server optimizer's state after the round (FedAvgM's
                                 momentum, FedAdam/Yogi/Adagrad's moments; ``.hpke`` when
                                 checkpoints are encrypted), which ``--resume`` restores
    rounds/round-001/            global adapter after round 1 (its method's format: peft's
                                 for LoRA and V1, ours for V2 and Excitor; the manifest
                                 records the method and its settings; with
                                 security.encrypt_checkpoints the weights are
                                 adapter_model.safetensors.hpke, encrypted to the aggregator)
    history.json, history.csv    one row per completed round
    perplexity.png, bytes.png    plots (see fed_llama.server.report)

A round is complete when its checkpoint and its history row (written at the end of the round,
after its held-out evaluation when it has one) are both written; ``--resume``
continues after the last complete round, so no round is lost or repeated (in an empty or
missing folder it starts the run).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fed_llama.adapter.state import State
from fed_llama.adapter.store import SEALED_WEIGHTS, read_manifest, save_adapter_state
from fed_llama.common.bounded_json import BadJson, loads
from fed_llama.common.files import write_bytes_atomic, write_text_atomic
from fed_llama.errors import ConfigError, FedLlamaError

log = logging.getLogger(__name__)

Cipher = Callable[[bytes, str], bytes]
"""Encrypts (or decrypts) a checkpoint's weights, bound to a label (run id and round)."""

EVALUATED = "pooled-perplexity"
"""The history key a round has only when its global adapter was evaluated on the held-out
sets (``federation.evaluate_every`` skips some rounds; the last is always evaluated)."""


def evaluated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history rows of the rounds whose global adapter was evaluated."""
    return [r for r in rows if EVALUATED in r]


def pooled_task_scores(row: dict[str, Any]) -> str:
    """A history row's pooled task scores as ``task/metric 0.123, ...`` ('' when it has none)."""
    return ", ".join(f"{k[len('pooled/'):]} {v:.3f}" for k, v in sorted(row.items())
                     if k.startswith("pooled/"))


RUN_ID = re.compile(r"run-[0-9a-f]{16}")
"""A run id as :meth:`RunStore.run_id` makes it."""
MAX_HISTORY_BYTES = 64 << 20
"""Largest ``history.json`` read (thousands of rounds of per-site rows)."""


def round_of(name: str) -> int:
    """The round number of a ``round-NNN[...]`` file or folder name (-1: not one)."""
    m = re.match(r"round-(\d{1,9})(?:\.|$)", name)
    return int(m.group(1)) if m else -1


class RunFolderError(FedLlamaError):
    """The run folder could not be written (read-only, full, gone): what and how to go on."""

    @classmethod
    def unwritable(cls, exc: OSError, store: RunStore) -> RunFolderError:
        done = store.completed_rounds()
        kept = f"rounds 1-{done} are intact in it" if done else "no round had completed"
        return cls(f"the run folder {store.out} cannot be written ({exc.strerror or exc}: "
                   f"{exc.filename}); {kept}. Make it writable or free space, then continue "
                   "the run (fed-llama simulate --resume with the same --out, or the same "
                   "flwr run again)")

    @staticmethod
    def concerns(exc: OSError, store: RunStore) -> bool:
        """Whether ``exc`` is a write into ``store``'s folder that failed."""
        name = exc.filename
        if not isinstance(name, str | Path):
            return False
        try:
            return Path(name).resolve().is_relative_to(store.out.resolve())
        except (OSError, ValueError):
            return False


class RunStore:
    """Reads and writes one run folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rounds_dir = out / "rounds"
        self.history_path = out / "history.json"
        self.optimizer_dir = out / "optimizer"

    def round_dir(self, server_round: int) -> Path:
        return self.rounds_dir / f"round-{server_round:03d}"

    def start(self, scenario_text: str, resume: bool, method: str | None = None) -> int:
        """Prepare the folder; return the last complete round (0 for a fresh run).
        ``method``: the adapter method the scenario trains (as manifests name it); resuming a
        run whose checkpoints are of another method is refused."""
        saved = self.out / "scenario.toml"
        fresh = not self.out.exists() or not any(self.out.iterdir())
        if resume and fresh:
            log.info("--resume: %s holds no run yet; starting one", self.out)
        if not resume or fresh:
            if self.out.exists() and any(self.out.iterdir()):
                raise ConfigError(f"--out {str(self.out)!r} already holds a run: pass --resume "
                                  "to continue it, or choose another folder")
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(saved, scenario_text)
            return 0
        if not saved.is_file():
            raise ConfigError(f"--resume: {str(self.out)!r} holds no run (no scenario.toml)")
        trained = self.saved_method()
        if method is not None and trained is not None and trained != method:
            raise ConfigError(f"--resume: the run in {str(self.out)!r} trains {trained}, the "
                              f"scenario {method}: a checkpoint of one adapter method cannot "
                              f"continue as another; set adapter.method back, or start a new "
                              "run in another --out")
        if saved.read_text() != scenario_text:
            raise ConfigError(f"--resume: the scenario differs from the one {str(self.out)!r} "
                              "was started with; resume with the same file or start a new run")
        done = self.completed_rounds()
        for extra in self.rounds_dir.glob("round-*"):  # a checkpoint whose round did not finish
            if round_of(extra.name) > done:
                shutil.rmtree(extra)
        for extra in self.optimizer_dir.glob("round-*"):
            if round_of(extra.name) > done:
                extra.unlink()
        return done

    def saved_method(self) -> str | None:
        """The adapter method of the run's latest checkpoint, as its manifest records it
        (``lora``, ``qlora``, ``llama-adapter``, ...); None before the first checkpoint."""
        rounds = sorted((round_of(p.name), p) for p in self.rounds_dir.glob("round-*")
                        if (p / "fed_llama_manifest.json").is_file())
        if not rounds:
            return None
        method = read_manifest(rounds[-1][1], sealed=True).get("method")
        return method if isinstance(method, str) else None

    def run_id(self) -> str:
        """This run's id (made on first use, kept across --resume): envelopes are bound to it."""
        path = self.out / "run-id"
        if not path.is_file():
            import secrets

            write_text_atomic(path, f"run-{secrets.token_hex(8)}\n")
        raw = path.read_bytes()[:64].decode("ascii", errors="replace").strip()
        if not RUN_ID.fullmatch(raw):
            raise ConfigError(f"{path} holds {raw[:40]!r}, not a run id (run- and 16 hex "
                              "digits): restore it, or start a new run in another --out")
        return raw

    def history(self) -> list[dict[str, Any]]:
        """The rows of ``history.json``; a file that is not a list of rows with a round number
        is refused with how to recover (``--resume`` trusts nothing else on disk)."""
        if not self.history_path.is_file():
            return []
        try:
            rows = loads(self.history_path.read_bytes(), max_bytes=MAX_HISTORY_BYTES,
                         constants=True)  # our own file: a metric may be NaN
            if not isinstance(rows, list) or not all(
                    isinstance(r, dict) and isinstance(r.get("round"), int)
                    and not isinstance(r.get("round"), bool) and r["round"] >= 0 for r in rows):
                raise BadJson("not a list of rows, each with its round number")
        except (OSError, BadJson) as exc:
            raise ConfigError(f"{self.history_path} cannot be read ({exc}): restore it from a "
                              "backup, or start a new run in another --out") from None
        return rows

    def completed_rounds(self) -> int:
        """The last round with both a checkpoint and a history row."""
        done = 0
        for row in self.history():
            r = int(row["round"])
            if (self.round_dir(r) / "adapter_config.json").is_file():
                done = max(done, r)
        return done

    def checkpoint_label(self, server_round: int) -> str:
        """What an encrypted checkpoint is bound to: this run and that round."""
        return f"{self.run_id()}/round-{server_round:03d}"

    def load_round(self, server_round: int, decrypt: Cipher | None = None) -> State:
        """The global adapter after ``server_round`` (``decrypt``: for encrypted checkpoints)."""
        from safetensors.torch import load, load_file

        folder = self.round_dir(server_round)
        read_manifest(folder, sealed=decrypt is not None)  # checks the hashes
        if (folder / SEALED_WEIGHTS).is_file() and decrypt is not None:
            return dict(load(decrypt((folder / SEALED_WEIGHTS).read_bytes(),
                                     self.checkpoint_label(server_round))))
        return dict(load_file(str(folder / "adapter_model.safetensors")))

    def save_round(self, server_round: int, state: State, peft_config: Any,
                   manifest: dict[str, Any], encrypt: Cipher | None = None) -> None:
        """Write the round's checkpoint (its weights encrypted with ``encrypt`` if given)."""
        label = self.checkpoint_label(server_round)
        meta = dict(manifest, round=server_round,
                    created=datetime.now(UTC).isoformat(timespec="seconds"))
        if encrypt is not None:
            meta["encrypted_at_rest"] = {"label": label}
        save_adapter_state(state, peft_config, self.round_dir(server_round), meta, force=True,
                           encrypt=None if encrypt is None else lambda b: encrypt(b, label))

    def save_optimizer(self, server_round: int, tensors: dict[str, Any],
                       encrypt: Cipher | None = None) -> None:
        """Write the server optimizer's state after ``server_round`` (nothing if empty)."""
        if not tensors:
            return
        from safetensors.numpy import save

        data = save(tensors)
        path = self._optimizer_file(server_round)
        if encrypt is not None:
            data = encrypt(data, self._optimizer_label(server_round))
            path = path.with_name(path.name + ".hpke")
        write_bytes_atomic(path, data, mode=0o600)

    def load_optimizer(self, server_round: int, decrypt: Cipher | None = None
                       ) -> dict[str, Any] | None:
        """The server optimizer's state after ``server_round``; None when none was saved."""
        from safetensors.numpy import load

        path = self._optimizer_file(server_round)
        sealed = path.with_name(path.name + ".hpke")
        if sealed.is_file():
            if decrypt is None:
                raise ConfigError(f"{sealed} is encrypted: resume with the aggregator's key "
                                  "(security.encrypt_checkpoints)")
            return dict(load(decrypt(sealed.read_bytes(), self._optimizer_label(server_round))))
        if path.is_file():
            return dict(load(path.read_bytes()))
        return None

    def _optimizer_file(self, server_round: int) -> Path:
        """Where the plain state of ``server_round`` goes (``.hpke`` appended when sealed)."""
        return self.optimizer_dir / f"round-{server_round:03d}.safetensors"

    def _optimizer_label(self, server_round: int) -> str:
        return f"{self.run_id()}/optimizer-{server_round:03d}"

    def record(self, row: dict[str, Any]) -> None:
        """Add or replace the row of ``row["round"]`` and rewrite the JSON and CSV."""
        rows = [r for r in self.history() if r["round"] != row["round"]]
        rows = sorted([*rows, row], key=lambda r: int(r["round"]))
        write_text_atomic(self.history_path, json.dumps(rows, indent=2))
        columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "round", k))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.out / "history.csv", buf.getvalue())
