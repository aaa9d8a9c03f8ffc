"""Packed arrays on the wire: the aggregator's side, as a wrapper around any strategy.

:class:`PackedArrays` sends the adapter in every training and evaluation message as one array
and its layout (:mod:`fed_llama.adapter.packed_arrays`: a handful of Flower objects instead of
two per tensor), and unpacks the replies that come back packed, before any other concern sees
them. The site's side is :func:`fed_llama.client.packing.packing_mod`, which unpacks what
arrives and packs its reply when the message came packed.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fed_llama.adapter.packed_arrays import packed_content, unpacked_content
from fed_llama.server.wrapper import StrategyWrapper


class PackedArrays(StrategyWrapper):
    """Packs the arrays of the messages sent; unpacks those of the replies."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return packed(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return packed(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        opened = self.each_reply(replies, unpacked, "the packed arrays cannot be unpacked")
        return super().aggregate_train(server_round, opened)


def packed(messages: Iterable[Message]) -> list[Message]:
    """``messages`` with their ARRAYS record packed (each distinct content packed once:
    Flower's strategies give every message of a round the same one)."""
    out = list(messages)
    done: dict[int, tuple[RecordDict, RecordDict]] = {}  # each content kept: its id stays its own
    for message in out:
        if message.has_content():
            content = message.content
            if id(content) not in done:
                done[id(content)] = (content, packed_content(content))
            message.content = done[id(content)][1]
    return out


def unpacked(reply: Message) -> None:
    """Unpack ``reply``'s ARRAYS record, where it came packed."""
    reply.content = unpacked_content(reply.content)
