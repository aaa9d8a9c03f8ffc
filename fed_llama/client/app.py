"""The Flower ClientApp: a site receives the global adapter, trains or evaluates, replies.

Only adapter tensors and a few numbers leave the site: the updated adapter and
``num-examples``, the local training loss and time (train), or the held-out loss and token
count (evaluate). ``fed-llama simulate`` builds the app around its scenario
(:func:`make_client_app`); ``flwr run .`` loads the one :mod:`fed_llama.launch.flwr_run`
builds, which reads the scenario file named by the run config's ``scenario`` key, or, on a
real site, takes the federation's settings from the messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_llama import wire
from fed_llama.adapter.state import State
from fed_llama.client import security
from fed_llama.client.clock import process_started_at
from fed_llama.client.compression import compression_mod
from fed_llama.client.federation import membership, named, queried_site
from fed_llama.client.packing import packing_mod
from fed_llama.client.records import round_number, torch_state
from fed_llama.common.notices import quiet_flower_actor
from fed_llama.config.scenario import ScenarioConfig

log = logging.getLogger(__name__)


def quiet_worker(msg: Message, context: Context,
                 call_next: Callable[[Message, Context], Message]) -> Message:
    """Every message: make sure this process (a simulation's Ray worker, or a SuperNode's
    ClientApp process) drops Flower's routine actor-shutdown notice; then handle the message."""
    quiet_flower_actor()
    return call_next(msg, context)


def secagg_when_asked(msg: Message, context: Context,
                      call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``secaggplus_mod`` on the messages of a SecAgg+ round; others pass through."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    out = secaggplus_mod(msg, context, call_next)
    sent = out.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
    if "fitres.metrics" in out.content.config_records and isinstance(sent, list):
        # the masked update's size (the other stages carry keys and shares: a few kB)
        size = sum(len(b) for b in sent if isinstance(b, bytes))
        out.content.config_records["fitres.metrics"]["bytes-up"] = float(size)
    return out


LOCAL_OPTIMIZER = "local-optimizer"
"""The node state's record holding the site's AdamW state (``local_optimizer = "keep"``)."""


def _fit(context: Context, sc: ScenarioConfig, site: int, state: State,
         server_round: int, proximal_mu: float = 0.0
         ) -> tuple[State, dict[str, float]]:
    """:func:`fed_llama.client.site.fit`, continuing the AdamW state the site kept in its node
    state from its previous round (``local_optimizer = "keep"``) and keeping this round's
    there (it is never sent)."""
    record = context.state.array_records.get(LOCAL_OPTIMIZER)
    from fed_llama.client import site as site_ops

    new_state, metrics, optimizer = site_ops.fit(
        sc, site, state, server_round, proximal_mu=proximal_mu,
        optimizer=torch_state(record) if record is not None else None)
    if optimizer:
        context.state[LOCAL_OPTIMIZER] = ArrayRecord(optimizer)
    return new_state, metrics


def _legacy_train(msg: Message, context: Context, sc: ScenarioConfig, site: int) -> Message:
    """A SecAgg+ round's training, in Flower's legacy fit layout (what the mod masks)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fed_llama.common.legacy_arrays import from_arrays, to_arrays

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    from fed_llama.training.site_model import initial_state

    keys = list(initial_state(sc))
    state = from_arrays(parameters_to_ndarrays(fitins.parameters), keys)
    value = fitins.config.get(wire.ROUND, 0)
    new_state, metrics = _fit(context, sc, site, state, value if isinstance(value, int) else 0)
    metrics["site"] = float(site)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(to_arrays(new_state, keys)),
                 int(metrics["num-examples"]), dict(metrics))
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _legacy_evaluate(msg: Message, sc: ScenarioConfig, site: int) -> Message:
    from flwr.common import Code, EvaluateRes, Status, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fed_llama.common.legacy_arrays import from_arrays

    ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    from fed_llama.client import site as site_ops
    from fed_llama.training.site_model import initial_state

    state = from_arrays(parameters_to_ndarrays(ins.parameters), list(initial_state(sc)))
    metrics: dict[str, Any] = dict(site_ops.evaluate(sc, site, state), site=float(site))
    res = EvaluateRes(Status(Code.OK, ""), float(metrics["heldout-loss"]),
                      int(metrics["num-examples"]), metrics)
    return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)


def _clocks(started: float) -> dict[str, float]:
    """When the process started, when the handler got the message and when it finished."""
    out = {wire.STARTED_AT: started, wire.DONE_AT: time.time()}
    if (process := process_started_at()) is not None:
        out[wire.PROCESS_STARTED_AT] = process
    return out


def _train(msg: Message, context: Context, scenario: ScenarioConfig | None) -> Message:
    started = time.time()
    if "fitins.parameters" in msg.content.array_records:  # a SecAgg+ round
        from flwr.compat.common import recorddict_compat as compat

        fit_config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
        member = membership(fit_config, context.node_config, context.run_config, scenario)
        return _legacy_train(msg, context, member.scenario, member.index)
    config = msg.content.config_records[wire.CONFIG]
    member = membership(config, context.node_config, context.run_config, scenario)
    state = torch_state(msg.content.array_records[wire.ARRAYS])
    carried = _carried_evaluation(config, member.scenario, member.index, state)
    mu = config.get(wire.PROXIMAL_MU, 0.0)  # sent by Flower's FedProx
    new_state, metrics = _fit(context, member.scenario, member.index, state,
                              round_number(config),
                              float(mu) if isinstance(mu, (int, float)) else 0.0)
    metrics[wire.SITE] = float(member.index)
    metrics.update(_clocks(started))
    if carried is not None:  # its time counts in this message's, its numbers go beside
        metrics[wire.CARRIED_EVALUATE_SECONDS] = carried.pop(wire.EVALUATE_SECONDS)
        metrics[wire.LOAD_SECONDS] += carried.pop(wire.LOAD_SECONDS)
    # plain records: with security.envelopes, envelope_mod puts the update in an envelope
    content = RecordDict({wire.ARRAYS: ArrayRecord(new_state),
                          wire.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    if carried is not None:
        content[wire.CARRIED_EVALUATION] = MetricRecord(carried)  # type: ignore[arg-type]
    return Message(content, reply_to=msg)


def _carried_evaluation(config: Mapping[str, Any], sc: ScenarioConfig, site: int,
                        state: State) -> dict[str, float] | None:
    """With ``federation.carry_evaluation``: the held-out evaluation of the adapter this
    training message carries (the previous round's global adapter), done before training on
    it; None when the aggregator asked for none, or when it failed (the site still trains:
    an evaluation never costs a round its update)."""
    previous = config.get(wire.EVALUATE_FIRST)
    if not previous:
        return None
    from fed_llama.client import site as site_ops

    try:
        metrics = site_ops.evaluate(sc, site, state)
    except Exception as exc:
        log.warning("site %s: the held-out evaluation of round %s's adapter failed (%s: %s); "
                    "training goes on without it", sc.site_names()[site], previous,
                    type(exc).__name__, str(exc)[:200])
        return None
    metrics[wire.SITE] = float(site)
    return metrics


def _evaluate(msg: Message, context: Context, scenario: ScenarioConfig | None) -> Message:
    started = time.time()
    if "evaluateins.parameters" in msg.content.array_records:  # a SecAgg+ run
        from flwr.compat.common import recorddict_compat as compat

        ev_config = compat.recorddict_to_evaluateins(msg.content, keep_input=True).config
        member = membership(ev_config, context.node_config, context.run_config, scenario)
        return _legacy_evaluate(msg, member.scenario, member.index)
    config: Mapping[str, Any] = msg.content.config_records.get("config", {})
    member = membership(config, context.node_config, context.run_config, scenario)
    state = torch_state(msg.content.array_records[wire.ARRAYS])
    from fed_llama.client import site as site_ops

    metrics = site_ops.evaluate(member.scenario, member.index, state)
    metrics["site"] = float(member.index)
    metrics.update(_clocks(started))
    content = RecordDict({wire.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    return Message(content, reply_to=msg)


def make_client_app(scenario: ScenarioConfig | None = None) -> ClientApp:
    """A ClientApp for ``scenario`` (None: read it from the run config)."""
    app = ClientApp(mods=[quiet_worker, secagg_when_asked, packing_mod,
                          security.envelope_mod(scenario), compression_mod(scenario)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        with named(context.node_config):
            return _train(msg, context, scenario)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        with named(context.node_config):
            return _evaluate(msg, context, scenario)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which site this node holds (asked once by a cyclic federation's server)."""

        with named(context.node_config):
            config: Mapping[str, Any] = msg.content.config_records.get("config", {})
            site = queried_site(config, context.node_config, context.run_config, scenario)
        return Message(RecordDict({wire.METRICS: MetricRecord({wire.SITE_QUERY: float(site)})}),
                       reply_to=msg)

    return app

