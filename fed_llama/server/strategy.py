"""Flower's strategies on fed-llama's adapter-aware mean, and the wrappers a scenario puts
around them.

Flower drives the rounds (sampling, messaging, timeouts). :class:`AdapterFedAvg` replaces only
how the admitted updates are combined (:func:`fed_llama.server.aggregation.combine`, or the
DP-FedAvg mean of :mod:`fed_llama.server.privacy`) and writes each round's history row.
Flower's server optimizers and FedProx take it as their FedAvg: each is a plain class here
(``class AdapterFedAdam(FedAdam, AdapterFedAvg)``), so FedAdam's step runs unchanged on the
adapter-aware mean. :func:`build_strategy` picks the class and wraps it in the scenario's
concerns (:mod:`fed_llama.server.wrapper`): cyclic turns, admission checks, compressed
updates, update envelopes, evaluation every few rounds.

Differential privacy stays inside the mean rather than around the strategy: its noise must
be added to the mean of the clipped changes before a server optimizer (FedAdam's step divides
by a running second moment, which would undo the sensitivity bound a noise added after it
relies on), and a wrapper around the whole strategy can only add it after.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
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
    Strategy,
)

from fed_llama import wire
from fed_llama.adapter.state import state_bytes
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.server.admission import Admission, admitted_replies
from fed_llama.server.aggregation import A_TAG, combine
from fed_llama.server.compression import CompressedUpdates
from fed_llama.server.cyclic import CyclicTurns
from fed_llama.server.envelopes import UpdateEnvelopes
from fed_llama.server.evaluation import EvaluateEvery, RowHook, pooled_evaluation
from fed_llama.server.outcome import split_replies
from fed_llama.server.packing import PackedArrays
from fed_llama.server.privacy import add_noise, epsilon
from fed_llama.server.round_book import RoundBook
from fed_llama.server.security import ServerGuard
from fed_llama.server.weights import bounded_weights
from fed_llama.server.wrapper import StrategyWrapper

log = logging.getLogger(__name__)


class AdapterFedAvg(FedAvg):
    """FedAvg whose mean is the scenario's adapter-aware aggregation.

    Construction follows Flower's signature; :meth:`bind` attaches the scenario afterwards.
    The replies it aggregates have passed the wrappers :func:`build_strategy` puts around it
    (they are plain: the adapter's arrays and the site's metrics, with its index).
    """

    scenario: ScenarioConfig
    book: RoundBook
    on_train: RowHook
    on_evaluate: RowHook

    def bind(self, scenario: ScenarioConfig, book: RoundBook, *, on_train: RowHook,
             on_evaluate: RowHook) -> AdapterFedAvg:
        self.scenario, self.book = scenario, book
        self.on_train, self.on_evaluate = on_train, on_evaluate
        return self

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        real = self.book.begin(server_round, arrays)
        config[wire.ROUND] = real  # Flower's server-round restarts at 1 on --resume
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.book.sent = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # the round configure_train began: a server optimizer on top may pass the run's round
        # number rather than Flower's (see RunRound)
        book = self.book
        real, current = book.real_round, book.current
        good, outcome = split_replies(replies, book.sent, real, refused=book.refused)
        row: dict[str, float] = {**outcome.counts(), **book.refusal_counts()}
        admitted = admitted_replies(good, book.site_names)
        # too few sites trained: no checkpoint, no seal, the run stops (RoundFailed)
        outcome.check(len(admitted), self.scenario.federation.min_sites, row)
        for reply, (site, _, _) in zip(good, admitted, strict=True):
            row[f"{site}/bytes-up"] = float(book.bytes_up.get(reply.metadata.src_node_id, 0))
        states = [state for _, state, _ in admitted]
        metrics = [m for _, _, m in admitted]
        fed, lora = self.scenario.federation, self.scenario.lora
        weights = bounded_weights([m[wire.NUM_EXAMPLES] for m in metrics], weighting=fed.weighting,
                                  max_ratio=fed.max_weight_ratio, max_examples=fed.max_examples,
                                  names=[f"round {real}: site {name!r}" for name, _, _ in
                                         admitted])
        dp = self.scenario.privacy
        if dp.noise_multiplier > 0:  # equal weights, clipped changes, Gaussian noise
            mean, info = combine(current, states, [1.0] * len(states),
                                 aggregation=fed.aggregation, clip_norm=dp.clip_norm,
                                 rank=lora.r, alpha=float(lora.alpha))
            trainable = ({k for k in current if A_TAG not in k}
                         if fed.aggregation == "ffa" else None)
            new = add_noise(mean, current, sites=len(states), clip_norm=dp.clip_norm,
                            noise_multiplier=dp.noise_multiplier, trainable=trainable)
            info["dp-epsilon"] = epsilon(real, dp.noise_multiplier, dp.delta)
            info["dp-delta"] = dp.delta
        else:
            ranks = [self.scenario.site_rank(book.site_names.index(name))
                     for name, _, _ in admitted] if fed.site_ranks else None
            new, info = combine(current, states, weights, aggregation=fed.aggregation,
                                robust=fed.robust, trim_fraction=fed.trim_fraction,
                                clip_norm=fed.clip_norm, rank=lora.r, alpha=float(lora.alpha),
                                site_ranks=ranks)
        arrived = len(good) + len(book.refused)  # every reply without an error
        row.update({"sites-trained": float(len(admitted)), **info,
                    "bytes-down": float(state_bytes(current) * arrived),
                    "bytes-up": float(sum(book.bytes_up.values()))})
        for name, _, m in admitted:
            row[f"{name}/train-loss"] = m.get("train-loss", math.nan)
            row[f"{name}/train-seconds"] = m.get("train-seconds", math.nan)
            for key in wire.SITE_TIMINGS:
                if key in m:  # the site's load for the message and when it had the message
                    row[f"{name}/train-{key}"] = m[key]
            if wire.CARRIED_EVALUATE_SECONDS in m:  # the previous round's, done before training
                row[f"{name}/{wire.CARRIED_EVALUATE_SECONDS}"] = m[wire.CARRIED_EVALUATE_SECONDS]
            if "optimizer-steps" in m:  # local_optimizer = "keep": the site's AdamW age
                row[f"{name}/optimizer-steps"] = m["optimizer-steps"]
        total = sum(weights)
        row["train-loss"] = sum(w * m.get("train-loss", math.nan) for w, m in
                                zip(weights, metrics, strict=True)) / total
        row["weight-max-share"] = max(weights) / total
        row.update({k: v for k, v in book.times.items() if k.startswith("train-")})
        self.on_train(real, row)
        # in the order of the arrays sent: Flower's server optimizers pair old and new arrays
        # by position, not by name
        ordered = {k: new[k] for k in current}
        return ArrayRecord(ordered), MetricRecord({"train-loss": row["train-loss"]})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        real = self.book.real(server_round)
        row = pooled_evaluation(real, list(replies), self.book.site_names)
        if row is None:
            return None
        row.update({k: v for k, v in self.book.times.items() if k.startswith("evaluate-")})
        self.on_evaluate(real, row)
        return MetricRecord({"pooled-loss": row["pooled-loss"]})


class RunRound:
    """For a server optimizer: hands its ``aggregate_train`` the run's round number instead
    of Flower's (which restarts at 1 on ``--resume``): FedAdam and FedYogi's bias correction
    depends on it, and a resumed run must take the steps of one never interrupted. Its result
    comes back in the dtypes of the adapter sent (Flower's FedOpt computes in float64, and
    the sites' float32 updates of the next round must match the global adapter's dtype)."""

    book: RoundBook

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(  # type: ignore[misc]
            self.book.real(server_round), replies)
        if arrays is None:
            return None, metrics
        sent = self.book.current
        new = arrays.to_torch_state_dict()
        return ArrayRecord({k: new[k].to(sent[k].dtype) for k in sent}), metrics


class AdapterFedProx(FedProx, AdapterFedAvg):
    """Flower's FedProx (``proximal-mu`` to the sites) on the adapter-aware mean."""


class AdapterFedAdam(RunRound, FedAdam, AdapterFedAvg):
    """Flower's FedAdam step on the adapter-aware mean."""


class AdapterFedYogi(RunRound, FedYogi, AdapterFedAvg):
    """Flower's FedYogi step on the adapter-aware mean."""


class AdapterFedAdagrad(RunRound, FedAdagrad, AdapterFedAvg):
    """Flower's FedAdagrad step on the adapter-aware mean."""


class AdapterFedAvgM(RunRound, FedAvgM, AdapterFedAvg):
    """Flower's FedAvgM (server momentum) on the adapter-aware mean."""


STRATEGIES: dict[str, type[AdapterFedAvg]] = {
    "fedavg": AdapterFedAvg, "fedprox": AdapterFedProx, "fedadam": AdapterFedAdam,
    "fedyogi": AdapterFedYogi, "fedadagrad": AdapterFedAdagrad, "fedavgm": AdapterFedAvgM,
}
"""``federation.strategy`` -> its class."""

ADAPTIVE_SERVER_LR = 1e-3
"""FedAdam/FedYogi/FedAdagrad's step when ``server_lr`` is 0: the order of a local AdamW step."""


def flower_arguments(scenario: ScenarioConfig, sites: int) -> dict[str, Any]:
    """The arguments of Flower's constructor for ``federation.strategy``."""
    fed = scenario.federation
    need = fed.min_sites or sites
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
    return kwargs


class FedLlama(StrategyWrapper):
    """The outermost layer: adds the federation's settings to every training and evaluation
    message (what a site on its own machine needs: :mod:`fed_llama.config.run_settings`), and
    names the stack in Flower's log (the settings stay out of it: Flower prints a strategy's
    start config in full)."""

    def __init__(self, strategy: Strategy, book: RoundBook, settings: dict[str, str]) -> None:
        super().__init__(strategy, book)
        self.settings = settings

    def summary(self) -> None:
        layers, inner = [], self.strategy
        while isinstance(inner, StrategyWrapper):
            layers.append(type(inner).__name__)
            inner = inner.strategy
        log.info("fed-llama: %s on %s; settings to the sites: %s", " > ".join(layers),
                 type(inner).__name__, ", ".join(sorted(self.settings)) or "none")
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        for key, value in self.settings.items():
            config[key] = value
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.book.times[f"train-{wire.SENT_AT}"] = time.time()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.book.times[f"train-{wire.RECEIVED_AT}"] = time.time()
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        for key, value in self.settings.items():
            config[key] = value
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.book.times[f"evaluate-{wire.SENT_AT}"] = time.time()
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        self.book.times[f"evaluate-{wire.RECEIVED_AT}"] = time.time()
        return super().aggregate_evaluate(server_round, replies)


def build_strategy(scenario: ScenarioConfig, site_names: list[str], *, round_offset: int,
                   on_train: RowHook, on_evaluate: RowHook,
                   on_carried_evaluation: RowHook | None = None,
                   security: ServerGuard | None = None,
                   site_nodes: dict[str, int] | None = None,
                   settings: dict[str, str] | None = None) -> Strategy:
    """The strategy named by ``federation.strategy`` on the adapter-aware mean, wrapped in
    the scenario's concerns (``site_nodes``: which node holds each site, for cyclic
    participation; ``security``: the aggregator's keys, for update envelopes; ``settings``:
    the config entries every message carries to the sites; ``on_carried_evaluation``: a
    round's evaluation that came back with the next round's updates, with
    ``federation.carry_evaluation``)."""
    fed = scenario.federation
    book = RoundBook(list(site_names), round_offset)
    core = STRATEGIES[fed.strategy](**flower_arguments(scenario, len(site_names)))
    strategy: Strategy = core.bind(scenario, book, on_train=on_train, on_evaluate=on_evaluate)
    if fed.participation == "cyclic":
        strategy = CyclicTurns(strategy, book, site_nodes or {})
    strategy = Admission(strategy, book, scenario)
    if fed.update_compression != "none":
        strategy = CompressedUpdates(strategy, book, fed.update_compression)
    if security is not None:
        strategy = UpdateEnvelopes(strategy, book, security)
    if fed.carry_evaluation and on_carried_evaluation is None:
        raise ValueError("federation.carry_evaluation needs a hook for the carried evaluations")
    strategy = EvaluateEvery(strategy, book, every=fed.evaluate_every, rounds=fed.rounds,
                             skipped=on_evaluate,
                             carried=on_carried_evaluation if fed.carry_evaluation else None)
    return FedLlama(PackedArrays(strategy, book), book, settings or {})
