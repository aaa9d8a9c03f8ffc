"""A strategy wrapped in one more concern, the way Flower wraps one in differential privacy.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` is a :class:`Strategy` that holds
another and changes what goes out (``configure_*``) or what comes back (``aggregate_*``)
before handing on. fed-llama's concerns that sit around aggregation are built the same way,
each in its own module and each with its site-side mod where it has one:

=============================================  ===============================================
wrapper                                        client side
=============================================  ===============================================
:class:`~fed_llama.server.packing.PackedArrays`  :func:`fed_llama.client.packing.packing_mod`
:class:`~fed_llama.server.cyclic.CyclicTurns`  (the site answers Flower's query message)
:class:`~fed_llama.server.envelopes.UpdateEnvelopes`  :func:`fed_llama.client.security.envelope_mod`
:class:`~fed_llama.server.admission.Admission`        none
:class:`~fed_llama.server.evaluation.EvaluateEvery`   the training handler (``carry_evaluation``)
=============================================  ===============================================

A wrapper passes replies that carry an error through untouched (the core strategy counts
them), takes out the replies it refuses and notes them in the shared
:class:`~fed_llama.server.round_book.RoundBook`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_llama import wire
from fed_llama.crypto.refusal import Refused
from fed_llama.server.round_book import RoundBook


class StrategyWrapper(Strategy):
    """A strategy that hands every step on to ``strategy`` unchanged; subclasses change one."""

    def __init__(self, strategy: Strategy, book: RoundBook) -> None:
        self.strategy = strategy
        self.book = book

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.book.begin(server_round, arrays)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.book.sent = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def each_reply(self, replies: Iterable[Message], change: Callable[[Message], None],
                   what: str) -> list[Message]:
        """The replies after ``change`` rewrote each in place: one that ``change`` refuses
        (or that makes it fail in any way: ``malformed``, saying it is ``what``) is noted in
        the round book and left out; a reply carrying an error passes untouched. The bytes
        of each update are noted as it arrived, before ``change``."""
        passed: list[Message] = []
        for reply in replies:
            if reply.has_error():  # the core strategy counts it as failed
                passed.append(reply)
                continue
            node = reply.metadata.src_node_id
            self.book.bytes_up.setdefault(node, carried_bytes(reply))
            try:
                change(reply)
            except Refused as exc:
                self.book.refuse(node, exc)
                continue
            except Exception as exc:  # nothing one reply holds may cost the round
                self.book.refuse(node, Refused("malformed", f"{what} ({type(exc).__name__}: "
                                               f"{str(exc)[:160]})"))
                continue
            passed.append(reply)
        return passed

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def innermost(strategy: Any) -> Any:
    """The strategy inside every wrapper (the one that aggregates and keeps the server
    optimizer's state)."""
    while isinstance(strategy, StrategyWrapper):
        strategy = strategy.strategy
    return strategy


def carried_bytes(reply: Message) -> int:
    """Bytes of the update a reply carries: the envelope, or the plain arrays (0 when it
    carries neither in a readable form)."""
    try:
        content = reply.content
        if wire.ENVELOPE in content.config_records:
            sealed = content.config_records[wire.ENVELOPE].get(wire.ENVELOPE_BYTES)
            return len(sealed) if isinstance(sealed, bytes) else 0
        if wire.ARRAYS in content.array_records:
            return sum(len(a.data) for a in content.array_records[wire.ARRAYS].values())
    except Exception:  # a malformed reply: it is refused on its own account
        return 0
    return 0
