"""What the aggregator checks of every update before it is aggregated.

An update must have exactly the global adapter's tensor names, shapes and dtypes, hold only
finite values of bounded magnitude, leave frozen tensors as they were, and change the global
adapter by no more than the configured bounds (an absolute L2 bound, and a multiple of the
median change of the round's updates). Each failure raises
:class:`~fed_llama.crypto.Refused` with its reason, so the round goes on without it.

:class:`Admission` wraps a strategy in these checks: it reads every plain reply (an
envelope has been opened by :class:`~fed_llama.server.envelopes.UpdateEnvelopes` around it),
takes out the ones refused, with their reasons, and hands on the rest.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fed_llama import wire
from fed_llama.adapter.rank import A_TAG, B_TAG, lora_pairs
from fed_llama.adapter.state import State
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.crypto.refusal import Refused
from fed_llama.server.evaluation import scalars
from fed_llama.server.round_book import RoundBook
from fed_llama.server.wrapper import StrategyWrapper, carried_bytes

log = logging.getLogger(__name__)

MAX_ABS_VALUE = 1e6
"""Largest magnitude of an adapter value (trained LoRA factors stay below 10): keeps every
product and sum the aggregation computes finite."""


def expected_shape(name: str, shape: tuple[int, ...], rank: int | None) -> tuple[int, ...]:
    """The shape of tensor ``name`` at LoRA rank ``rank`` (None: the global adapter's)."""
    if rank is None or len(shape) != 2:
        return shape
    if A_TAG in name:
        return (rank, shape[1])
    if B_TAG in name:
        return (shape[0], rank)
    return shape


def check_update(update: State, current: State, rank: int | None = None) -> None:
    """Refuse ``update`` unless it has the global adapter's tensors (at the site's ``rank``
    when sites train their own ranks) and only finite values."""
    if set(update) != set(current):
        missing, extra = sorted(set(current) - set(update)), sorted(set(update) - set(current))
        raise Refused("wrong-names", f"{len(missing)} tensor(s) missing (e.g. {missing[:1]}), "
                      f"{len(extra)} unexpected (e.g. {extra[:1]})")
    for name, ref in current.items():
        got = update[name]
        if not isinstance(got, torch.Tensor):
            raise Refused("wrong-dtype", f"{name}: not a tensor")
        want = expected_shape(name, tuple(ref.shape), rank)
        if tuple(got.shape) != want:
            raise Refused("wrong-shape", f"{name}: shape {tuple(got.shape)}, expected {want}")
        if got.dtype != ref.dtype:
            raise Refused("wrong-dtype", f"{name}: dtype {got.dtype}, the global adapter's is "
                          f"{ref.dtype}")
        if not bool(torch.isfinite(got).all()):
            raise Refused("non-finite", f"{name}: holds NaN or Inf")
        if got.numel() and float(got.abs().max()) > MAX_ABS_VALUE:
            raise Refused("norm-bound", f"{name}: a value of magnitude "
                          f"{float(got.abs().max()):.3g}, over {MAX_ABS_VALUE:.0e}")


def check_frozen(update: State, current: State, frozen: set[str]) -> None:
    """Refuse ``update`` if it changed a tensor the method keeps frozen (FFA-LoRA's A)."""
    for name in sorted(frozen):
        if not torch.equal(update[name], current[name]):
            raise Refused("frozen-changed", f"{name}: changed, but it is frozen (FFA-LoRA "
                          "trains B only)")


def change_norm(update: State, current: State, scales: tuple[float, float] | None = None
                ) -> float:
    """The L2 norm of ``update - current`` over every tensor; with ``scales`` (the update's
    and the global ``alpha / r``), of the change of each layer's ``scale * B @ A`` instead,
    which compares updates of different ranks."""
    if scales is None:
        total = sum(float(((update[k].double() - current[k].double()) ** 2).sum())
                    for k in current)
        return float(total ** 0.5)
    total = 0.0
    for a, b in lora_pairs(current):
        new = scales[0] * update[b].double() @ update[a].double()
        old = scales[1] * current[b].double() @ current[a].double()
        total += float(((new - old) ** 2).sum())
    return float(total ** 0.5)


def check_norm(norm: float, max_norm: float) -> None:
    if max_norm and norm > max_norm:
        raise Refused("norm-bound", f"the update changes the adapter by {norm:.4g}; the bound "
                      f"(security.max_update_norm) is {max_norm:.4g}")


def norm_outliers(norms: list[float], factor: float) -> list[int]:
    """Indices of changes more than ``factor`` times the median of ``norms`` (3 or more)."""
    if not factor or len(norms) < 3:
        return []
    median = statistics.median(norms)
    return [i for i, n in enumerate(norms) if n > factor * max(median, 1e-12)]


Admitted = tuple[str, State, dict[str, float]]
"""An update that passed: (site, adapter state, metrics)."""


def read_reply(reply: Message, site_names: list[str]) -> Admitted:
    """A plain reply's (site, adapter state, metrics): the site by its index in the
    scenario, or :class:`Refused`."""
    content = reply.content
    metrics = scalars(content.metric_records[wire.METRICS])
    if wire.ARRAYS not in content.array_records:
        raise Refused("malformed", "the reply carries no adapter arrays")
    state = content.array_records[wire.ARRAYS].to_torch_state_dict()
    index = int(metrics.get(wire.SITE, -1))
    if not 0 <= index < len(site_names):
        raise Refused("unknown-site", f"site index {index} names no site of the scenario")
    return site_names[index], state, metrics


class Admission(StrategyWrapper):
    """Hands on only the updates that pass every check of this module; each refusal is
    noted in the round book with its reason (``sites-refused``, ``refused/<reason>``)."""

    def __init__(self, strategy: Strategy, book: RoundBook, scenario: ScenarioConfig) -> None:
        super().__init__(strategy, book)
        self.scenario = scenario

    def rank(self, site: str) -> int | None:
        """The rank ``site`` trains when sites train their own ranks (else None)."""
        if not self.scenario.federation.site_ranks:
            return None
        return self.scenario.site_rank(self.book.site_names.index(site))

    def norm(self, site: str, state: State) -> float:
        """How far ``state`` moves the global adapter (on the products for own ranks)."""
        rank, current = self.rank(site), self.book.current
        if rank is None:
            return change_norm(state, current)
        alpha = float(self.scenario.lora.alpha)
        return change_norm(state, current, (alpha / rank, alpha / self.scenario.lora.r))

    def check(self, reply: Message) -> Admitted:
        """One reply's update, checked, or :class:`Refused`."""
        site, state, metrics = read_reply(reply, self.book.site_names)
        current = self.book.current
        check_update(state, current, self.rank(site))
        if self.scenario.federation.aggregation == "ffa":
            check_frozen(state, current, {k for k in current if A_TAG in k})
        check_norm(self.norm(site, state), self.scenario.security.max_update_norm)
        count = metrics.get(wire.NUM_EXAMPLES, math.nan)
        if not math.isfinite(count) or count <= 0:
            raise Refused("malformed", "the update reports no positive, finite num-examples")
        return site, state, metrics

    def check_safely(self, reply: Message) -> Admitted:
        """:meth:`check`, with whatever else a hostile reply makes it raise turned into a
        refusal (``malformed``): one reply never costs the round the others' updates."""
        try:
            return self.check(reply)
        except Refused:
            raise
        except Exception as exc:  # a reply no check foresaw: refuse it, keep the round
            raise Refused("malformed", f"the reply cannot be processed "
                          f"({type(exc).__name__}: {str(exc)[:120]})") from None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        book = self.book
        passed: list[Message] = []
        admitted: list[tuple[Message, str, State]] = []
        for reply in replies:
            if reply.has_error():  # the core strategy counts it as failed
                passed.append(reply)
                continue
            node = reply.metadata.src_node_id
            book.bytes_up.setdefault(node, carried_bytes(reply))
            try:
                site, state, _ = self.check_safely(reply)
                if any(site == s for _, s, _ in admitted):
                    raise Refused("replayed", f"site {site!r} already delivered this round")
            except Refused as exc:
                book.refuse(node, exc)
                continue
            admitted.append((reply, site, state))
        norms = [self.norm(site, state) for _, site, state in admitted]
        factor = self.scenario.security.norm_outlier_factor
        for i in reversed(norm_outliers(norms, factor)):
            reply, site, _ = admitted.pop(i)
            book.refuse(reply.metadata.src_node_id, Refused(
                "norm-bound", f"site {site!r} changes the adapter by {norms[i]:.4g}, over "
                f"{factor:g} x the median change"))
        return self.strategy.aggregate_train(server_round,
                                             passed + [reply for reply, _, _ in admitted])


def admitted_replies(replies: Iterable[Any], site_names: list[str]) -> list[Admitted]:
    """What the replies that reached the core strategy carry (after :class:`Admission`)."""
    return [read_reply(reply, site_names) for reply in replies]
