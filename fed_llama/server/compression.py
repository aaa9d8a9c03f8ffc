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
from fed_llama.server.round_book import RoundBook
from fed_llama.server.wrapper import StrategyWrapper


class CompressedUpdates(StrategyWrapper):
    """Decompresses each reply's update (``scheme``: ``int8`` or ``int4``) before handing on."""

    def __init__(self, strategy: Strategy, book: RoundBook, scheme: str) -> None:
        super().__init__(strategy, book)
        self.scheme = scheme

    def decode(self, reply: Message) -> None:
        """Replace the compressed change ``reply`` carries by the adapter it describes."""
        record = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
        state = decompress(record, self.book.current, self.scheme)
        reply.content[wire.ARRAYS] = ArrayRecord(state)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        decoded = self.each_reply(replies, self.decode, "the compressed update cannot be decoded")
        return self.strategy.aggregate_train(server_round, decoded)
