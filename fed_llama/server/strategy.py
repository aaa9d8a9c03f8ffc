"""Flower's FedAvg with LoRA-aware aggregation and per-site bookkeeping.

Flower drives the rounds (sampling, messaging, timeouts); this class replaces only how the
sites' replies are combined (:func:`fed_llama.server.aggregation.combine`) and records what
each site reported, which Flower's default metric averaging would blur together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
)

from fed_llama import wire
from fed_llama.adapter.state import State, state_bytes
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.crypto.refusal import Refused
from fed_llama.server.admission import (
    change_norm,
    check_frozen,
    check_norm,
    check_update,
    norm_outliers,
)
from fed_llama.server.aggregation import A_TAG, combine
from fed_llama.server.cyclic import turn
from fed_llama.server.outcome import split_replies
from fed_llama.server.privacy import add_noise, epsilon
from fed_llama.server.security import ServerGuard
from fed_llama.server.weights import bounded_weights

log = logging.getLogger(__name__)

RowHook = Callable[[int, dict[str, float]], None]


def scalars(record: Any) -> dict[str, float]:
    """The numeric entries of a MetricRecord."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


class LoraFedAvg(FedAvg):
    """FedAvg whose aggregation is the scenario's LoRA-aware mode.

    Flower's server optimizers (FedAdam, FedYogi, FedAdagrad, FedAvgM) and FedProx call
    ``super().aggregate_train`` and then apply their own update, so :func:`build_strategy`
    places this class between them and FedAvg (``class X(FedAdam, LoraFedAvg)``) and they run
    unchanged on top of the LoRA-aware aggregate. Construction follows Flower's signature;
    :meth:`bind` attaches the scenario afterwards.
    """

    scenario: ScenarioConfig
    site_names: list[str]
    round_offset: int
    on_train: RowHook
    on_evaluate: RowHook
    current: State
    real_round: int
    """The run's round being trained (Flower's server-round plus ``round_offset``)."""
    security: ServerGuard | None
    site_nodes: dict[str, int]
    """Which node holds each site (``participation = "cyclic"`` only: whose turn goes where)."""
    sent_nodes: list[int]
    """The nodes this round's training message went to (:mod:`fed_llama.server.outcome`)."""

    def bind(self, scenario: ScenarioConfig, site_names: list[str], *, round_offset: int,
             on_train: RowHook, on_evaluate: RowHook,
             security: ServerGuard | None = None,
             site_nodes: dict[str, int] | None = None) -> LoraFedAvg:
        self.scenario = scenario
        self.site_names = site_names
        self.round_offset = round_offset
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        self.security = security
        self.site_nodes = site_nodes or {}
        if scenario.federation.participation == "cyclic" and set(self.site_nodes) != set(
                site_names):
            raise ValueError("participation = 'cyclic' needs the node of every site "
                             "(fed_llama.server.cyclic.site_nodes)")
        return self

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()  # the global adapter sent this round
        real = self.round_offset + server_round
        self.real_round = real
        config[wire.ROUND] = real  # Flower's server-round restarts at 1 on --resume
        if self.security is not None:
            for key, value in self.security.round_config(real, self.current).items():
                config[key] = value
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.scenario.federation.participation == "cyclic":  # only this round's site
            site = turn(real, self.site_names)
            messages = [m for m in messages if m.metadata.dst_node_id == self.site_nodes[site]]
            if not messages:
                log.warning("round %d: the node of site %r is not connected; no site trains "
                            "this round", real, site)
        self.sent_nodes = [m.metadata.dst_node_id for m in messages]
        return messages

    def _admit(self, reply: Message, real_round: int) -> tuple[str, State, dict[str, float]]:
        """One reply's (site, adapter state, metrics), verified and checked, or Refused."""
        content = reply.content
        if self.security is not None:
            if wire.ENVELOPE not in content.config_records:
                raise Refused("malformed", "the reply carries no update envelope")
            sealed = content.config_records[wire.ENVELOPE].get(wire.ENVELOPE_BYTES)
            site, state, metrics = self.security.open(sealed, real_round, self.current)
        else:
            metrics = scalars(content.metric_records[wire.METRICS])
            if wire.ARRAYS not in content.array_records:
                raise Refused("malformed", "the reply carries no adapter arrays")
            state = content.array_records[wire.ARRAYS].to_torch_state_dict()
            index = int(metrics.get("site", -1))
            if not 0 <= index < len(self.site_names):
                raise Refused("unknown-site", f"site index {index} names no site of the "
                              "scenario")
            site = self.site_names[index]
        if site not in self.site_names:
            raise Refused("unknown-site", f"site {site!r} is not part of this scenario")
        check_update(state, self.current, self._rank(site))
        if self.scenario.federation.aggregation == "ffa":
            check_frozen(state, self.current, {k for k in self.current if A_TAG in k})
        check_norm(self._norm(site, state), self.scenario.security.max_update_norm)
        return site, state, metrics

    def _admit_safely(self, reply: Message, real_round: int
                      ) -> tuple[str, State, dict[str, float]]:
        """:meth:`_admit`, with whatever else a hostile reply makes it raise turned into a
        refusal (``malformed``): one reply never costs the round the others' updates."""
        try:
            return self._admit(reply, real_round)
        except Refused:
            raise
        except Exception as exc:  # a reply no check foresaw: refuse it, keep the round
            raise Refused("malformed", f"the reply cannot be processed "
                          f"({type(exc).__name__}: {str(exc)[:120]})") from None

    def _rank(self, site: str) -> int | None:
        """The rank ``site`` trains when sites train their own ranks (else None)."""
        if not self.scenario.federation.site_ranks:
            return None
        return self.scenario.site_rank(self.site_names.index(site))

    def _norm(self, site: str, state: State) -> float:
        rank = self._rank(site)
        if rank is None:
            return change_norm(state, self.current)
        alpha = float(self.scenario.lora.alpha)
        return change_norm(state, self.current, (alpha / rank, alpha / self.scenario.lora.r))

    def admit_all(self, replies: list[Message], real_round: int, row: dict[str, float]
                  ) -> list[tuple[str, State, dict[str, float]]]:
        """The replies that pass every check; each refusal is logged and counted in ``row``."""
        admitted: list[tuple[str, State, dict[str, float]]] = []
        refused: list[str] = []
        for reply in replies:
            try:
                site, state, metrics = self._admit_safely(reply, real_round)
                count = metrics.get(wire.NUM_EXAMPLES, math.nan)
                if not math.isfinite(count) or count <= 0:
                    raise Refused("malformed", "the update reports no positive, finite "
                                  "num-examples")
                if any(site == s for s, _, _ in admitted):
                    raise Refused("replayed", f"site {site!r} already delivered this round")
                admitted.append((site, state, metrics))
                row[f"{site}/bytes-up"] = float(_reply_bytes(reply))
            except Refused as exc:
                refused.append(exc.reason)
                log.warning("round %d: an update from node %s was %s", real_round,
                            reply.metadata.src_node_id, exc)
        norms = [self._norm(site, state) for site, state, _ in admitted]
        factor = self.scenario.security.norm_outlier_factor
        for i in reversed(norm_outliers(norms, factor)):
            site = admitted.pop(i)[0]
            refused.append("norm-bound")
            log.warning("round %d: the update of site %r was refused (norm-bound): it changes "
                        "the adapter by %.4g, over %g x the median change", real_round, site,
                        norms[i], factor)
        row["sites-refused"] = float(len(refused))
        for reason in refused:
            row[f"refused/{reason}"] = row.get(f"refused/{reason}", 0.0) + 1
        return admitted

    def _good(self, replies: Iterable[Message], kind: str, real_round: int) -> list[Message]:
        replies = list(replies)
        good = [m for m in replies if not m.has_error()]
        if len(good) < len(replies):
            log.warning("round %d %s: %d of %d site(s) failed or dropped out; going on with %d",
                        real_round, kind, len(replies) - len(good), len(replies), len(good))
        return good

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # the round configure_train sent: a server optimizer on top may pass the run's round
        # number rather than Flower's (see build_strategy)
        real = self.real_round
        good, outcome = split_replies(replies, self.sent_nodes, real)
        row: dict[str, float] = outcome.counts()
        admitted = self.admit_all(good, real, row)
        # too few sites trained: no checkpoint, no seal, the run stops (RoundFailed)
        outcome.check(len(admitted), self.scenario.federation.min_sites, row)
        states = [state for _, state, _ in admitted]
        metrics = [m for _, _, m in admitted]
        fed, lora = self.scenario.federation, self.scenario.lora
        weights = bounded_weights([m[wire.NUM_EXAMPLES] for m in metrics], weighting=fed.weighting,
                                  max_ratio=fed.max_weight_ratio, max_examples=fed.max_examples,
                                  names=[f"round {real}: site {name!r}" for name, _, _ in
                                         admitted])
        down = state_bytes(self.current)
        dp = self.scenario.privacy
        if dp.noise_multiplier > 0:  # equal weights, clipped changes, Gaussian noise
            mean, info = combine(self.current, states, [1.0] * len(states),
                                 aggregation=fed.aggregation, clip_norm=dp.clip_norm,
                                 rank=lora.r, alpha=float(lora.alpha))
            trainable = ({k for k in self.current if A_TAG not in k}
                         if fed.aggregation == "ffa" else None)
            new = add_noise(mean, self.current, sites=len(states), clip_norm=dp.clip_norm,
                            noise_multiplier=dp.noise_multiplier, trainable=trainable)
            info["dp-epsilon"] = epsilon(real, dp.noise_multiplier, dp.delta)
            info["dp-delta"] = dp.delta
        else:
            ranks = [self.scenario.site_rank(self.site_names.index(name))
                     for name, _, _ in admitted] if fed.site_ranks else None
            new, info = combine(self.current, states, weights, aggregation=fed.aggregation,
                                robust=fed.robust, trim_fraction=fed.trim_fraction,
                                clip_norm=fed.clip_norm, rank=lora.r, alpha=float(lora.alpha),
                                site_ranks=ranks)
        up = [_reply_bytes(m) for m in good]
        row.update({"sites-trained": float(len(admitted)), **info,
                    "bytes-down": float(down * len(good)), "bytes-up": float(sum(up))})
        for name, _, m in admitted:
            row[f"{name}/train-loss"] = m.get("train-loss", math.nan)
            row[f"{name}/train-seconds"] = m.get("train-seconds", math.nan)
            if "optimizer-steps" in m:  # local_optimizer = "keep": the site's AdamW age
                row[f"{name}/optimizer-steps"] = m["optimizer-steps"]
        total = sum(weights)
        row["train-loss"] = sum(w * m.get("train-loss", math.nan) for w, m in
                                zip(weights, metrics, strict=True)) / total
        row["weight-max-share"] = max(weights) / total
        self.on_train(real, row)
        # in the order of the arrays sent: Flower's server optimizers pair old and new arrays
        # by position, not by name
        ordered = {k: new[k] for k in self.current}
        return ArrayRecord(ordered), MetricRecord({"train-loss": row["train-loss"]})

    def evaluates(self, real_round: int) -> bool:
        """Whether round ``real_round`` ends with a held-out evaluation
        (``federation.evaluate_every``, and always the last round)."""
        fed = self.scenario.federation
        return real_round % fed.evaluate_every == 0 or real_round >= fed.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.evaluates(self.round_offset + server_round):
            return []  # no messages: Flower goes on to the checkpoint at once
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        real = self.round_offset + server_round
        if not self.evaluates(real):  # the round's row, with its training metrics only
            self.on_evaluate(real, {})
            return None
        good = self._good(replies, "evaluate", real)
        reports: list[dict[str, float]] = []
        for reply in good:
            try:
                reports.append(evaluation_report(reply, len(self.site_names), reports))
            except Refused as exc:
                log.warning("round %d: the evaluation from node %s was %s", real,
                            reply.metadata.src_node_id, exc)
        if not reports:
            log.error("round %d: no site's evaluation could be used", real)
            return None
        row = evaluation_row(reports, self.site_names)
        row["evaluations-refused"] = float(len(good) - len(reports))
        self.on_evaluate(self.round_offset + server_round, row)
        return MetricRecord({"pooled-loss": row["pooled-loss"]})


def evaluation_report(reply: Message, sites: int, seen: list[dict[str, float]]
                      ) -> dict[str, float]:
    """One evaluation reply's numbers, checked (a site index of the scenario, not seen
    before; finite loss, positive token count, finite scores), or :class:`Refused`."""
    try:
        met = scalars(reply.content.metric_records[wire.METRICS])
    except Exception as exc:  # no MetricRecord, or one that cannot be read
        raise Refused("malformed", f"no evaluation metrics ({type(exc).__name__})") from None
    index = met.get("site", -1.0)
    if not (math.isfinite(index) and index == int(index) and 0 <= index < sites):
        raise Refused("unknown-site", f"site index {index:.4g} names no site of the scenario")
    if any(m["site"] == index for m in seen):
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
        name = site_names[int(met["site"])]
        loss, n = met["heldout-loss"], met["heldout-tokens"]
        for key, value in met.items():
            if key.startswith("task/"):  # task/<task>/<metric>: this site's scores
                row[f"{name}/{key[5:]}"] = value
        row[f"{name}/loss"] = loss
        row[f"{name}/perplexity"] = math.exp(min(loss, 50.0))
        nll += loss * n
        tokens += n
    row["pooled-loss"] = nll / tokens
    row["pooled-perplexity"] = math.exp(min(row["pooled-loss"], 50.0))
    row.update(pool_task_scores(site_metrics))
    return row


ADAPTIVE_SERVER_LR = 1e-3
"""FedAdam/FedYogi/FedAdagrad's step when ``server_lr`` is 0: the order of a local AdamW step."""


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


def _reply_bytes(reply: Message) -> int:
    """Bytes of the update a reply carries: the envelope, or the plain arrays (0 when it
    carries neither in a readable form)."""
    try:
        return _carried_bytes(reply)
    except Exception:  # a malformed reply: it was refused already
        return 0


def _carried_bytes(reply: Message) -> int:
    content = reply.content
    if wire.ENVELOPE in content.config_records:
        sealed = content.config_records[wire.ENVELOPE].get(wire.ENVELOPE_BYTES)
        return len(sealed) if isinstance(sealed, bytes) else 0
    if wire.ARRAYS in content.array_records:
        return sum(len(a.data) for a in content.array_records[wire.ARRAYS].values())
    return 0


SERVER_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad, "fedavgm": FedAvgM,
}


def build_strategy(scenario: ScenarioConfig, site_names: list[str], *, round_offset: int,
                   on_train: RowHook, on_evaluate: RowHook,
                   security: ServerGuard | None = None,
                   site_nodes: dict[str, int] | None = None) -> LoraFedAvg:
    """Flower's strategy named by ``federation.strategy``, on LoRA-aware aggregation
    (``site_nodes``: which node holds each site, for cyclic participation)."""
    fed = scenario.federation
    need = fed.min_sites or len(site_names)
    kwargs: dict[str, Any] = {"fraction_train": 1.0, "fraction_evaluate": 1.0,
                              "min_train_nodes": need, "min_evaluate_nodes": need,
                              "min_available_nodes": need}
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedavgm":
        kwargs["server_momentum"] = fed.server_momentum
        if fed.server_lr:
            kwargs["server_learning_rate"] = fed.server_lr
    elif fed.strategy != "fedavg":
        kwargs["eta"] = fed.server_lr or ADAPTIVE_SERVER_LR
    base = SERVER_STRATEGIES[fed.strategy]
    cls: type[LoraFedAvg] = LoraFedAvg
    if base is not FedAvg:
        def aggregate_train(self: LoraFedAvg, server_round: int, replies: Iterable[Message]
                            ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            # the next class in the MRO (the server optimizer's own aggregate_train, or ours
            # when it has none, as FedProx), with the run's round instead of Flower's (which
            # restarts at 1 on --resume): FedAdam and FedYogi's bias correction depends on it
            result: tuple[ArrayRecord | None, MetricRecord | None] = super(
                cls, self).aggregate_train(self.round_offset + server_round, replies)
            return result

        cls = type(f"Lora{base.__name__}", (base, LoraFedAvg),
                   {"aggregate_train": aggregate_train})
    return cls(**kwargs).bind(scenario, site_names, round_offset=round_offset,
                              on_train=on_train, on_evaluate=on_evaluate, security=security,
                              site_nodes=site_nodes)
