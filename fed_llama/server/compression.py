"""Compressed updates: the aggregator's side, as a wrapper around any strategy.

With ``federation.update_compression`` a site sends its change to the global adapter quantized
(:mod:`fed_llama.adapter.compression`; the site's side is
:func:`fed_llama.client.compression.compression_mod`). :class:`CompressedUpdates` turns each
reply back into the adapter it describes before the admission checks see it, or refuses it
(``malformed``) when the record does not fit the adapter. It sits inside
:class:`~fed_llama.server.envelopes.UpdateEnvelopes`: the compressed change is what the site
signs and encrypts.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fed_llama import wire
from fed_llama.adapter.compression import decompress
from fed_llama.crypto.refusal import Refused
from fed_llama.server.admission import carried_bytes
from fed_llama.server.round_book import RoundBook
from fed_llama.server.wrapper import StrategyWrapper


class CompressedUpdates(StrategyWrapper):
    """Decompresses each reply's update (``scheme``: ``int8`` or ``int4``) before handing on."""

    def __init__(self, strategy: Strategy, book: RoundBook, scheme: str) -> None:
        super().__init__(strategy, book)
        self.scheme = scheme

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        passed: list[Message] = []
        for reply in replies:
            if reply.has_error():  # the core strategy counts it as failed
                passed.append(reply)
                continue
            node = reply.metadata.src_node_id
            self.book.bytes_up.setdefault(node, carried_bytes(reply))
            try:
                record = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
                state = decompress(record, self.book.current, self.scheme)
            except Exception as exc:  # a record that does not fit, or cannot be read
                self.book.refuse(node, Refused(
                    "malformed", f"the compressed update cannot be decoded "
                    f"({type(exc).__name__}: {str(exc)[:160]})"))
                continue
            reply.content[wire.ARRAYS] = ArrayRecord(state)
            passed.append(reply)
        return self.strategy.aggregate_train(server_round, passed)
