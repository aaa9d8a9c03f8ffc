"""What the aggregator's strategy and its wrappers share about the round in progress.

Flower numbers a run's rounds from 1 again after ``--resume``; fed-llama's rounds go on from
the last checkpoint (``round_offset``). Each round's page is opened when the round is
configured (:meth:`RoundBook.begin`); each wrapper around the core strategy
(:mod:`fed_llama.server.wrapper`) notes on it what it did to the round's replies: which nodes
the round went to, the updates it refused and why, the bytes each update took on the wire.
The core strategy writes the round's history row from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flwr.app import ArrayRecord

from fed_llama.adapter.state import State
from fed_llama.crypto.refusal import Refused

log = logging.getLogger(__name__)


@dataclass
class RoundBook:
    """One run's rounds as the aggregator's strategy and wrappers see them."""

    site_names: list[str]
    """The scenario's sites, in order (a plain reply names its site by index)."""
    round_offset: int = 0
    """Rounds done before this process started (``--resume``)."""
    real_round: int = 0
    """The run's round in progress (Flower's server-round plus ``round_offset``)."""
    current: State = field(default_factory=dict)
    """The global adapter sent this round."""
    sent: list[int] = field(default_factory=list)
    """The nodes this round's training message went to (the outermost wrapper's say)."""
    refused: dict[int, str] = field(default_factory=dict)
    """Node -> the reason its update was refused this round."""
    bytes_up: dict[int, int] = field(default_factory=dict)
    """Node -> bytes of the update it sent this round, as it arrived (envelope or arrays)."""
    times: dict[str, float] = field(default_factory=dict)
    """This round's phase times (``train-sent-at`` ...), for the history row."""

    def real(self, server_round: int) -> int:
        """The run's number of Flower's round ``server_round``."""
        return self.round_offset + server_round

    def begin(self, server_round: int, arrays: ArrayRecord) -> int:
        """Start round ``server_round`` (Flower's numbering) on the global adapter ``arrays``
        (once: the core strategy and each wrapper call this, whichever comes first starts
        the round); return the run's round number."""
        real = self.real(server_round)
        if real != self.real_round or not self.current:
            self.real_round = real
            self.current = dict(arrays.to_torch_state_dict())
            self.sent, self.refused, self.bytes_up, self.times = [], {}, {}, {}
        return self.real_round

    def refuse(self, node: int, exc: Refused) -> None:
        """Note (and log) that ``node``'s update was refused this round."""
        self.refused[node] = exc.reason
        log.warning("round %d: an update from node %s was %s", self.real_round, node, exc)

    def refusal_counts(self) -> dict[str, float]:
        """The history row's ``sites-refused`` and ``refused/<reason>`` counts."""
        row = {"sites-refused": float(len(self.refused))}
        for reason in self.refused.values():
            row[f"refused/{reason}"] = row.get(f"refused/{reason}", 0.0) + 1
        return row
