"""Signed, encrypted updates: the aggregator's side, as a wrapper around any strategy.

Each round :class:`UpdateEnvelopes` adds the run id and, with ``security.seal_rounds``, the
round seal (the aggregator's signature over the global adapter it sends, hash-chained to the
previous round's) to the training config. Each reply comes back as an envelope, which it
verifies and decrypts (:meth:`fed_llama.server.security.ServerGuard.open`) and hands on as a
plain reply (the adapter's arrays and the metrics the site signed, with the site's index), or
refuses with the reason. The site's side is :func:`fed_llama.client.security.envelope_mod`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_llama import wire
from fed_llama.crypto.refusal import Refused
from fed_llama.server.round_book import RoundBook
from fed_llama.server.security import ServerGuard
from fed_llama.server.wrapper import StrategyWrapper


class UpdateEnvelopes(StrategyWrapper):
    """Seals each round for the sites and opens each site's envelope before handing on."""

    def __init__(self, strategy: Strategy, book: RoundBook, guard: ServerGuard) -> None:
        super().__init__(strategy, book)
        self.guard = guard

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        real = self.book.begin(server_round, arrays)
        for key, value in self.guard.round_config(real, self.book.current).items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def open(self, reply: Message) -> None:
        """Replace the envelope ``reply`` carries by the plain update inside, or refuse."""
        content = reply.content
        if wire.ENVELOPE not in content.config_records:
            raise Refused("malformed", "the reply carries no update envelope")
        sealed = content.config_records[wire.ENVELOPE].get(wire.ENVELOPE_BYTES)
        site, state, metrics = self.guard.open(sealed, self.book.real_round, self.book.current)
        if site not in self.book.site_names:
            raise Refused("unknown-site", f"site {site!r} is not part of this scenario")
        try:
            arrays = ArrayRecord(state)
        except TypeError as exc:  # a dtype Flower's records cannot carry (bfloat16)
            raise Refused("wrong-dtype", f"the update holds a tensor of a dtype the global "
                          f"adapter does not use ({exc})") from None
        reply.content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord(
            {**metrics, wire.SITE: float(self.book.site_names.index(site))})})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        opened = self.each_reply(replies, self.open, "the reply cannot be processed")
        return self.strategy.aggregate_train(server_round, opened)
