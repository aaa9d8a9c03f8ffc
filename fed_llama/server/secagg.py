"""Secure aggregation: the rounds on Flower's SecAgg+ workflow, the aggregator sees only a sum.

Flower 1.41 runs SecAgg+ on its legacy server stack only (``SecAggPlusWorkflow`` inside a
``DefaultWorkflow`` with a ``LegacyContext`` and a ``flwr.server.strategy`` strategy; sites add
``secaggplus_mod``). Each site masks its adapter (clipped, quantized, weighted by its example
count) with pairwise and private masks; the aggregator can unmask only the weighted sum, which
the workflow hands to :class:`SecAggFedAvg` as every site's result. This module keeps the
product's bookkeeping on top of it: a checkpoint per round, per-site evaluation, history rows.

Adapter tensors travel as Flower's legacy parameter lists
(:mod:`fed_llama.common.legacy_arrays`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fed_llama import wire
from fed_llama.adapter.state import State, state_bytes
from fed_llama.common.legacy_arrays import from_arrays, to_arrays
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.server.evaluation import RowHook, evaluation_row

log = logging.getLogger(__name__)


class SecAggFedAvg(LegacyFedAvg):
    """Flower's (legacy) FedAvg for the SecAgg+ workflow, with fed-llama's bookkeeping.

    The workflow has already unmasked the example-weighted mean and put it in every result;
    this class takes it as the new global adapter and records the round.
    """

    def __init__(self, scenario: ScenarioConfig, state: State, *, round_offset: int,
                 on_train: RowHook, on_evaluate: RowHook,
                 checkpoint: Callable[[int, State], None]) -> None:
        self.scenario = scenario
        self.site_names = scenario.site_names()
        self.keys = list(state)
        self.round_offset = round_offset
        self.on_train, self.on_evaluate, self.checkpoint = on_train, on_evaluate, checkpoint
        self.state_size = state_bytes(state)
        from flwr.common import ndarrays_to_parameters

        need = scenario.federation.min_sites or scenario.secagg_threshold()

        def config(server_round: int) -> dict[str, Any]:
            return {wire.ROUND: round_offset + server_round}

        super().__init__(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=need,
                         min_evaluate_clients=need, min_available_clients=len(self.site_names),
                         initial_parameters=ndarrays_to_parameters(to_arrays(state, self.keys)),
                         on_fit_config_fn=config, on_evaluate_config_fn=config)

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]
                      ) -> tuple[Any, dict[str, Any]]:
        real = self.round_offset + server_round
        missing = len(self.site_names) - len(results)  # Flower may count one site twice
        if failures or missing:
            log.warning("round %d: %d site(s) failed or dropped out; SecAgg+ went on with %d",
                        real, missing, len(results))
        if not results:
            log.error("round %d: no site finished; the global adapter stays as it was", real)
            return None, {}
        parameters = results[0][1].parameters  # the unmasked weighted mean, in every result
        row: dict[str, float] = {"sites-trained": float(len(results)),
                                 "sites-failed": float(missing),
                                 "sites-refused": 0.0,
                                 "bytes-down": float(self.state_size * len(self.site_names))}
        weights = [float(res.num_examples) for _, res in results]
        for _, res in results:
            name = self.site_names[int(res.metrics["site"])]
            row[f"{name}/train-loss"] = float(res.metrics.get("train-loss", math.nan))
            row[f"{name}/train-seconds"] = float(res.metrics.get("train-seconds", math.nan))
            if wire.LOAD_SECONDS in res.metrics:
                row[f"{name}/train-{wire.LOAD_SECONDS}"] = float(res.metrics[wire.LOAD_SECONDS])
            if "optimizer-steps" in res.metrics:  # local_optimizer = "keep": the site's AdamW age
                row[f"{name}/optimizer-steps"] = float(res.metrics["optimizer-steps"])
            if "bytes-up" in res.metrics:  # the masked update, measured by the site
                row[f"{name}/bytes-up"] = float(res.metrics["bytes-up"])
                row["bytes-up"] = row.get("bytes-up", 0.0) + float(res.metrics["bytes-up"])
        row["train-loss"] = sum(w * float(res.metrics.get("train-loss", math.nan))
                                for (_, res), w in zip(results, weights, strict=True)
                                ) / sum(weights)
        self.on_train(real, row)
        return parameters, {}

    def evaluate(self, server_round: int, parameters: Any) -> tuple[float, dict[str, Any]] | None:
        """Called after each round's aggregation (and before round 1): the checkpoint."""
        if server_round > 0:
            from flwr.common import parameters_to_ndarrays

            self.checkpoint(self.round_offset + server_round,
                            from_arrays(parameters_to_ndarrays(parameters), self.keys))
        return None

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                           ) -> tuple[float | None, dict[str, Any]]:
        if not results:
            return None, {}
        site_metrics = [{k: float(v) for k, v in res.metrics.items()
                         if isinstance(v, int | float)} for _, res in results]
        row = evaluation_row(site_metrics, self.site_names)
        self.on_evaluate(self.round_offset + server_round, row)
        return row["pooled-loss"], {}


def run_secure_rounds(grid: Grid, context: Context, strategy: SecAggFedAvg, rounds: int) -> None:
    """Run ``rounds`` rounds of ``strategy`` on Flower's SecAgg+ workflow."""
    sa, scenario = strategy.scenario.secure_aggregation, strategy.scenario
    sites = len(strategy.site_names)
    legacy = LegacyContext(context=context, config=ServerConfig(
        num_rounds=rounds, round_timeout=scenario.federation.round_timeout), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=sites, reconstruction_threshold=scenario.secagg_threshold(),
        max_weight=sa.max_weight, clipping_range=sa.clipping_range, timeout=sa.timeout))
    log.info("secure aggregation (SecAgg+): %d sites, threshold %d, clipping range %g",
             sites, scenario.secagg_threshold(), sa.clipping_range)
    workflow(grid, legacy)
