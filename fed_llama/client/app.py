"""The Flower ClientApp: a site receives the global adapter, trains or evaluates, replies.

Only adapter tensors and a few numbers leave the site: the updated adapter and
``num-examples``, the local training loss and time (train), or the held-out loss and token
count (evaluate). ``fed-llama simulate`` builds the app around its scenario
(:func:`make_client_app`); ``flwr run .`` uses the module-level ``app``, which reads the
scenario file named by the run config's ``scenario`` key.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_llama.client import security
from fed_llama.client import site as site_ops
from fed_llama.config.loader import load_config
from fed_llama.config.scenario import (
    DEFAULT_SCENARIO,
    ScenarioConfig,
    run_config_path,
    with_key_folder,
)


def scenario_from_run_config(context: Context) -> ScenarioConfig:
    """The scenario named by ``run_config["scenario"]`` (relative to the project folder)."""
    scenario = load_config(ScenarioConfig, run_config_path(context.run_config, "scenario",
                                                           DEFAULT_SCENARIO))
    return with_key_folder(scenario, context.run_config)


def _site(context: Context, scenario: ScenarioConfig) -> int:
    site = int(context.node_config.get("partition-id", -1))
    count = len(scenario.site_names())
    if not 0 <= site < count:
        raise ValueError(f"node_config partition-id {site} names no site of the scenario "
                         f"({count} sites)")
    return site


def make_client_app(scenario: ScenarioConfig | None = None) -> ClientApp:
    """A ClientApp for ``scenario`` (None: read it from the run config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sc = scenario or scenario_from_run_config(context)
        site = _site(context, sc)
        state = msg.content.array_records["arrays"].to_torch_state_dict()
        config = msg.content.config_records["config"]
        value = config.get("fed-round", config.get("server-round", 0))
        server_round = value if isinstance(value, int) else 0
        mu = config.get("proximal-mu", 0.0)  # sent by Flower's FedProx
        name = sc.site_names()[site]
        sec = sc.security
        if sec.envelopes:  # check the seal before spending any time on training
            key, server = security.site_keys(sec, name, context.node_config)
            run = security.check_round(sec, server, config, state, server_round)
        new_state, metrics = site_ops.fit(sc, site, state, server_round,
                                          proximal_mu=float(mu) if isinstance(mu, (int, float))
                                          else 0.0)
        metrics["site"] = float(site)
        if sec.envelopes:
            sealed = security.seal_update(key, server, run=run, server_round=server_round,
                                          state=new_state, metrics=metrics)
            content = RecordDict({"metrics": MetricRecord({"num-examples": metrics[
                "num-examples"], "site": float(site)}),
                "envelope": ConfigRecord({"sealed": sealed})})
        else:
            content = RecordDict({"arrays": ArrayRecord(new_state),
                                  "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        sc = scenario or scenario_from_run_config(context)
        site = _site(context, sc)
        state = msg.content.array_records["arrays"].to_torch_state_dict()
        metrics = site_ops.evaluate(sc, site, state)
        metrics["site"] = float(site)
        content = RecordDict({"metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
        return Message(content, reply_to=msg)

    return app


app = make_client_app()
