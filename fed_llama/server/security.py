"""The aggregator's side of the update protocol: seal each round, open and check each update.

Each round the aggregator sends the sites its run id and, with ``seal_rounds``, a signed seal
of the global adapter they start from (hash-chained to the previous round's, kept in the run
folder under ``seals/``). Each update comes back as an envelope; :meth:`ServerGuard.open`
verifies and decrypts it (:class:`fed_llama.server.envelopes.UpdateEnvelopes` does this for
each reply; :mod:`fed_llama.server.admission` then checks its contents) or raises
:class:`~fed_llama.crypto.Refused` with the reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_llama import wire
from fed_llama.adapter.state import State, state_digest
from fed_llama.common.files import write_text_atomic
from fed_llama.config.security import SecurityConfig
from fed_llama.crypto import ReplayGuard, RoundSeal, open_envelope, seal_round
from fed_llama.crypto.keyring import KeyFolder, passphrase_from_env
from fed_llama.crypto.keys import ServerKey, TrustStore
from fed_llama.crypto.refusal import Refused

log = logging.getLogger(__name__)

ENVELOPE_SLACK = 1 << 16
"""Bytes an envelope may carry beyond its tensors (header, HPKE encapsulation, signature)."""
PER_TENSOR_SLACK = 512
"""Bytes per tensor for its entries in the safetensors header and the envelope's manifest."""


@dataclass
class ServerGuard:
    """The aggregator's keys, trust store and replay memory for one run."""

    cfg: SecurityConfig
    key: ServerKey
    trust: TrustStore
    run: str
    seals_dir: Path
    clock: Callable[[], float] = time.time
    guard: ReplayGuard = field(default_factory=ReplayGuard)

    @classmethod
    def load(cls, cfg: SecurityConfig, keys: KeyFolder, run: str, seals_dir: Path
             ) -> ServerGuard:
        key = ServerKey.load(keys.server_key, passphrase_from_env(cfg.passphrase_env))
        trust = TrustStore.load(keys.trust)
        log.info("update envelopes on: kem %s, %d enrolled site(s), run %s", key.kem,
                 len(trust.sites), run)
        return cls(cfg, key, trust, run, seals_dir)

    def _seal_path(self, server_round: int) -> Path:
        return self.seals_dir / f"round-{server_round:03d}.json"

    def round_config(self, server_round: int, state: State) -> dict[str, str]:
        """What goes into round ``server_round``'s train config: run id and, if on, the seal."""
        config = {wire.RUN_ID: self.run}
        if self.cfg.seal_rounds:
            prev_path = self._seal_path(server_round - 1)
            prev = RoundSeal.parse(prev_path.read_bytes()) if prev_path.is_file() else None
            seal = seal_round(self.key, run=self.run, server_round=server_round,
                              adapter_sha256=state_digest(state), prev=prev)
            text = json.dumps(seal.to_json())
            write_text_atomic(self._seal_path(server_round), text + "\n")
            config[wire.ROUND_SEAL] = text
        return config

    def open(self, data: Any, server_round: int, current: State) -> tuple[str, State,
                                                                           dict[str, float]]:
        """Verify and decrypt one update; return (site, adapter state, metrics). The update's
        contents are checked by :mod:`fed_llama.server.admission`."""
        from safetensors.torch import load

        size = sum(v.numel() * v.element_size() for v in current.values())
        opened = open_envelope(data, server_key=self.key, trust=self.trust, run=self.run,
                               server_round=server_round, guard=self.guard,
                               max_bytes=size + PER_TENSOR_SLACK * len(current) + ENVELOPE_SLACK,
                               max_age=self.cfg.max_age, clock=self.clock)
        try:
            state = load(opened.payload)
        except Exception as exc:  # safetensors' own errors; the layout was checked already
            raise Refused("malformed", f"the update cannot be loaded: {exc}") from exc
        return opened.header.site, state, opened.header.metrics
