"""Cyclic weight transfer: one site trains per round, in site order, continuing the adapter.

With ``federation.participation = "cyclic"`` round k is site ``(k - 1) mod N``'s turn: it
receives the adapter the previous site returned, trains its local steps and sends it back;
the server checks it as any update and it becomes the global adapter. A federation of R
rounds of all N sites thus becomes N·R turns with the same local steps in all, taken one
after the other as centralized training takes them (parallel FedAvg takes only R·S of them in
sequence). The price: N times the wall time per training step, and the sites visited last
weigh most in the result (the shared learning-rate schedule decays towards the end).

Flower routes messages by node id, which the server does not know in advance; before the
first round the server asks every node which site it holds (a ``query`` message listing the
sites' names, which the ClientApp answers with its site's position: from its site config's
``name`` on a real site, its ``partition-id`` in a simulation). An answer decides only whose
turn a node gets: each update is still verified under the site key of its envelope.

:class:`CyclicTurns` wraps a strategy so that each round's training message goes to the node
whose turn it is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fed_llama import wire
from fed_llama.server.round_book import RoundBook
from fed_llama.server.wrapper import StrategyWrapper

log = logging.getLogger(__name__)



def turn(real_round: int, sites: list[str]) -> str:
    """The site whose turn round ``real_round`` (1-based, the run's numbering) is."""
    return sites[(real_round - 1) % len(sites)]


def _site_index(reply: Message) -> int | None:
    """The whole site index a query reply carries (None: none that can be read)."""
    try:
        value = reply.content.metric_records[wire.METRICS][wire.SITE_QUERY]
    except Exception:  # no metrics record, or no such key
        return None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        return None
    return int(value)


def site_nodes(grid: Grid, sites: list[str], timeout: float) -> dict[str, int]:
    """Which node holds which site: once as many nodes as sites are connected (Flower's own
    wait), each is asked once; refuses a federation in which a site has no node or two nodes
    claim one site."""
    _, nodes = sample_nodes(grid, len(sites), len(sites))
    # a real site answers by its name among the sites
    ask = ConfigRecord({wire.ASK: wire.SITE_QUERY, wire.SITES: list(sites)})
    queries = [Message(RecordDict({wire.CONFIG: ask}),
                       dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    found: dict[str, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            log.warning("node %s did not say which site it holds: %s",
                        reply.metadata.src_node_id, reply.error.reason)
            continue
        index = _site_index(reply)
        if index is None:
            log.warning("node %s answered the site query with no site index; it gets no turn",
                        reply.metadata.src_node_id)
            continue
        if not 0 <= index < len(sites):
            raise ValueError(f"node {reply.metadata.src_node_id} holds site index {index}, "
                             f"which names no site of this scenario ({len(sites)} sites)")
        if sites[index] in found:
            raise ValueError(f"two nodes ({found[sites[index]]} and "
                             f"{reply.metadata.src_node_id}) hold site {sites[index]!r}: "
                             "give each node its own partition-id")
        found[sites[index]] = reply.metadata.src_node_id
    missing = [s for s in sites if s not in found]
    if missing:
        raise ValueError(f"participation = 'cyclic' needs a node for every site; none answered "
                         f"for {missing} (of {len(nodes)} connected node(s))")
    log.info("cyclic turns: %s", ", ".join(f"{s} (node {found[s]})" for s in sites))
    return found


class CyclicTurns(StrategyWrapper):
    """Sends each round's training message to the node of the site whose turn it is
    (``site_nodes``: from :func:`site_nodes`), and to no other."""

    def __init__(self, strategy: Strategy, book: RoundBook, site_nodes: dict[str, int]
                 ) -> None:
        super().__init__(strategy, book)
        if set(site_nodes) != set(book.site_names):
            raise ValueError("participation = 'cyclic' needs the node of every site "
                             "(fed_llama.server.cyclic.site_nodes)")
        self.site_nodes = site_nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        real = self.book.begin(server_round, arrays)
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        site = turn(real, self.book.site_names)
        mine = [m for m in messages if m.metadata.dst_node_id == self.site_nodes[site]]
        if not mine:
            log.warning("round %d: the node of site %r is not connected; no site trains "
                        "this round", real, site)
        self.book.sent = [m.metadata.dst_node_id for m in mine]
        return mine
