"""The held-out evaluation of a round: which rounds evaluate, and what the sites' reports make.

Every site evaluates the global adapter on its own held-out split and reports its loss, token
count and task scores (never data). :func:`evaluation_report` checks one reply;
:func:`evaluation_row` pools the reports into the round's history row. :class:`EvaluateEvery`
wraps a strategy so that only every ``federation.evaluate_every``-th round (and the last)
evaluates, and, with ``federation.carry_evaluation``, has a round's evaluation carried by the
next round's training messages: each site evaluates the adapter it receives before it trains on
it (:func:`fed_llama.client.app.make_client_app`), and the report comes back beside its update
(``wire.CARRIED_EVALUATION``) to complete the previous round's row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_llama import wire
from fed_llama.crypto.refusal import Refused
from fed_llama.server.round_book import RoundBook
from fed_llama.server.wrapper import StrategyWrapper

log = logging.getLogger(__name__)

RowHook = Callable[[int, dict[str, float]], None]
"""Called with a round (the run's numbering) and its history row."""


def scalars(record: Any) -> dict[str, float]:
    """The numeric entries of a MetricRecord."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


class EvaluateEvery(StrategyWrapper):
    """Held-out evaluation every ``every`` rounds and after round ``rounds`` (the run's last);
    a round without it still ends with its row (``skipped(round, {})``).

    With ``carried`` (a hook), a round's evaluation other than the last's sends no messages:
    its row is recorded without it, the next round's training messages ask the sites to
    evaluate the adapter they carry first (``wire.EVALUATE_FIRST``), and the pooled reports
    that come back with the updates go to ``carried(round, row)``. The last round evaluates in
    messages of its own, as there is no next round to carry it."""

    def __init__(self, strategy: Strategy, book: RoundBook, *, every: int, rounds: int,
                 skipped: RowHook, carried: RowHook | None = None) -> None:
        super().__init__(strategy, book)
        self.every, self.rounds, self.skipped = every, rounds, skipped
        self.carried = carried

    def evaluates(self, real_round: int) -> bool:
        """Whether round ``real_round`` ends with a held-out evaluation."""
        return real_round % self.every == 0 or real_round >= self.rounds

    def own_messages(self, real_round: int) -> bool:
        """Whether round ``real_round``'s evaluation goes in evaluation messages of its own."""
        return self.evaluates(real_round) and not self.carries(real_round)

    def carries(self, real_round: int) -> bool:
        """Whether round ``real_round``'s evaluation rides on the next round's training."""
        return (self.carried is not None and 1 <= real_round < self.rounds
                and self.evaluates(real_round))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        previous = self.book.real(server_round) - 1
        # the adapter sent is the one round `previous` made (on --resume too: the checkpoint);
        # Flower hands every round the same config record: a round that carries none says so
        config[wire.EVALUATE_FIRST] = previous if self.carries(previous) else 0
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        previous = self.book.real(server_round) - 1
        if self.carried is not None and self.carries(previous):
            # recorded before the round's updates are aggregated: that round is complete
            row = pooled_evaluation(previous, replies, self.book.site_names,
                                    record=wire.CARRIED_EVALUATION)
            if row is not None:
                self.carried(previous, row)
        for reply in replies:  # Flower's strategies take one MetricRecord a reply
            if not reply.has_error() and wire.CARRIED_EVALUATION in reply.content:
                del reply.content[wire.CARRIED_EVALUATION]
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.own_messages(self.book.real(server_round)):
            return []  # no messages: Flower goes on to the checkpoint at once
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        real = self.book.real(server_round)
        if not self.own_messages(real):  # the round's row, with its training metrics only
            if self.carries(real):
                log.info("round %d/%d: its held-out evaluation comes back with round %d's "
                         "updates (federation.carry_evaluation)", real, self.rounds, real + 1)
            else:
                log.info("round %d/%d: not evaluated (held-out evaluation every %d rounds and "
                         "after the last)", real, self.rounds, self.every)
            self.skipped(real, {})
            return None
        return self.strategy.aggregate_evaluate(server_round, replies)


def pooled_evaluation(real: int, replies: list[Message], site_names: list[str], *,
                      record: str = wire.METRICS) -> dict[str, float] | None:
    """Round ``real``'s evaluation row from the reports in ``replies`` (each in its
    ``record``); a reply with an error, or a report :func:`evaluation_report` refuses, is left
    out with a warning; None (and an error logged) when no report can be used."""
    good = [m for m in replies if not m.has_error()]
    if len(good) < len(replies):
        log.warning("round %d evaluate: %d of %d site(s) failed or dropped out; going on "
                    "with %d", real, len(replies) - len(good), len(replies), len(good))
    reports: list[dict[str, float]] = []
    for reply in good:
        try:
            reports.append(evaluation_report(reply, len(site_names), reports, record=record))
        except Refused as exc:
            log.warning("round %d: the evaluation from node %s was %s", real,
                        reply.metadata.src_node_id, exc)
    if not reports:
        log.error("round %d: no site's evaluation could be used", real)
        return None
    row = evaluation_row(reports, site_names)
    row["evaluations-refused"] = float(len(good) - len(reports))
    return row


def evaluation_report(reply: Message, sites: int, seen: list[dict[str, float]], *,
                      record: str = wire.METRICS) -> dict[str, float]:
    """One evaluation reply's numbers (its MetricRecord ``record``), checked (a site index of
    the scenario, not seen before; finite loss, positive token count, finite scores), or
    :class:`Refused`."""
    try:
        met = scalars(reply.content.metric_records[record])
    except Exception as exc:  # no MetricRecord, or one that cannot be read
        raise Refused("malformed", f"no evaluation metrics ({type(exc).__name__})") from None
    index = met.get(wire.SITE, -1.0)
    if not (math.isfinite(index) and index == int(index) and 0 <= index < sites):
        raise Refused("unknown-site", f"site index {index:.4g} names no site of the scenario")
    if any(m[wire.SITE] == index for m in seen):
        raise Refused("replayed", f"site index {int(index)} already reported this round")
    loss, tokens = met.get("heldout-loss", math.nan), met.get("heldout-tokens", math.nan)
    if not (math.isfinite(loss) and loss >= 0 and math.isfinite(tokens) and 0 < tokens <= 1e12
            and all(math.isfinite(v) for v in met.values())):
        raise Refused("malformed", "the held-out loss, token count or a score is missing, "
                      "negative or not finite")
    return met


def evaluation_row(site_metrics: list[dict[str, float]], site_names: list[str]
                   ) -> dict[str, float]:
    """A round's evaluation row from what each site reported (``site``, ``heldout-loss``,
    ``heldout-tokens``, ``task/...``): per-site and token-pooled perplexity, task scores."""
    row: dict[str, float] = {"sites-evaluated": float(len(site_metrics))}
    nll = tokens = 0.0
    for met in site_metrics:
        name = site_names[int(met[wire.SITE])]
        loss, n = met["heldout-loss"], met["heldout-tokens"]
        for key, value in met.items():
            if key.startswith("task/"):  # task/<task>/<metric>: this site's scores
                row[f"{name}/{key[5:]}"] = value
        if wire.EVALUATE_SECONDS in met:
            row[f"{name}/{wire.EVALUATE_SECONDS}"] = met[wire.EVALUATE_SECONDS]
        for key in wire.SITE_TIMINGS:
            if key in met:
                row[f"{name}/evaluate-{key}"] = met[key]
        row[f"{name}/loss"] = loss
        row[f"{name}/perplexity"] = math.exp(min(loss, 50.0))
        nll += loss * n
        tokens += n
    row["pooled-loss"] = nll / tokens
    row["pooled-perplexity"] = math.exp(min(row["pooled-loss"], 50.0))
    row.update(pool_task_scores(site_metrics))
    return row


def pool_task_scores(metrics: list[dict[str, float]]) -> dict[str, float]:
    """``pooled/<task>/<metric>``: each site's mean score weighted by its question count."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for met in metrics:
        for key, value in met.items():
            parts = key.split("/")
            if parts[0] != "task" or len(parts) != 3 or parts[2] == "n":
                continue
            n = met.get(f"task/{parts[1]}/n", 0.0)
            sums[key] = sums.get(key, 0.0) + value * n
            counts[key] = counts.get(key, 0.0) + n
    return {f"pooled/{k[5:]}": sums[k] / counts[k] for k in sums if counts[k]}
