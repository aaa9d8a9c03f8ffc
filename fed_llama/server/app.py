"""The Flower ServerApp: run the rounds, checkpoint the global adapter, record the history."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fed_llama.config.run_settings import federation_settings
from fed_llama.config.scenario import (
    ScenarioConfig,
)
from fed_llama.crypto.keyring import KeyFolder
from fed_llama.server.checkpoint import (
    EVALUATED,
    RunFolderError,
    RunStore,
    pooled_task_scores,
)
from fed_llama.server.optimizer_state import export_state, restore_state, uses_server_state
from fed_llama.server.outcome import RoundFailed
from fed_llama.server.pull_retry import retry_pulls
from fed_llama.server.report import plot_history
from fed_llama.server.security import ServerGuard
from fed_llama.server.strategy import build_strategy
from fed_llama.wire import BACKBONE_SHA256, SETTINGS

log = logging.getLogger(__name__)


def run_federation(grid: Grid, scenario: ScenarioConfig, store: RunStore, done: int,
                   context: Context | None = None) -> None:
    """Run the rounds after ``done`` (the last complete round) to ``federation.rounds``
    (``context``: the ServerApp's, which secure aggregation's workflow needs)."""
    from fed_llama.backbone.load import resolve_backbone
    from fed_llama.config.adapter import method_label
    from fed_llama.training.method import adapter_config
    from fed_llama.training.site_model import initial_state

    total = scenario.federation.rounds
    if done >= total:
        log.info("all %d rounds are already complete in %s", total, store.out)
        return
    source = resolve_backbone(scenario.backbone.name)
    guard = None
    if scenario.security.envelopes:
        guard = ServerGuard.load(scenario.security, KeyFolder(Path(scenario.security.keys)),
                                 store.run_id(), store.out / "seals")
    encrypt = decrypt = None
    if guard is not None and scenario.security.encrypt_checkpoints:
        from fed_llama.crypto.at_rest import checkpoint_ciphers

        encrypt, decrypt = checkpoint_ciphers(guard.key)

    state = store.load_round(done, decrypt) if done else initial_state(scenario)
    # each method's folder in its own format: peft's for LoRA and V1, ours for V2 and Excitor
    peft_cfg = adapter_config(scenario, source.model_dir)
    sites = scenario.site_names()
    backbone_bytes = _backbone_bytes(source.model_dir)
    rows: dict[int, dict[str, Any]] = {}

    mark = [time.monotonic()]  # when the current round started

    def on_train(server_round: int, row: dict[str, float]) -> None:
        rows[server_round] = {"round": server_round, "backbone-bytes": backbone_bytes,
                              "train-phase-seconds": round(time.monotonic() - mark[0], 2),
                              **row}
        log.info("round %d/%d: %d site(s) trained, %d update(s) refused, train loss %.4f",
                 server_round, total, int(row["sites-trained"]),
                 int(row.get("sites-refused", 0)), row["train-loss"])
        if "dp-epsilon" in row:
            log.info("round %d/%d: differential privacy so far: epsilon %.3g at delta %.1e",
                     server_round, total, row["dp-epsilon"], row["dp-delta"])

    def on_evaluate(server_round: int, row: dict[str, float]) -> None:
        now = time.monotonic()
        full = {**rows.pop(server_round, {"round": server_round}), **row,
                "round-seconds": round(now - mark[0], 2)}
        mark[0] = now
        store.record(full)
        plot_history(store.history(), sites, store.out)
        if EVALUATED in row:  # else EvaluateEvery said why not, or when it comes
            log_evaluation(server_round, row)

    def on_carried_evaluation(server_round: int, row: dict[str, float]) -> None:
        """Round ``server_round``'s evaluation, back with the next round's updates: into
        its row, which was recorded when the round ended."""
        past = [r for r in store.history() if r["round"] == server_round]
        store.record({**(past[0] if past else {"round": server_round}), **row})
        plot_history(store.history(), sites, store.out)
        log_evaluation(server_round, row)

    def log_evaluation(server_round: int, row: dict[str, float]) -> None:
        per_site = ", ".join(f"{s} {row.get(f'{s}/perplexity', float('nan')):.2f}"
                             for s in sites)
        log.info("round %d/%d: pooled held-out perplexity %.2f (%s)", server_round, total,
                 row["pooled-perplexity"], per_site)
        scores = pooled_task_scores(row)
        if scores:
            log.info("round %d/%d: pooled task scores: %s", server_round, total, scores)

    def save(real: int, new_state: dict[str, Any]) -> None:
        store.save_round(real, new_state, peft_cfg, {
            "kind": "global-adapter",
            "method": method_label(scenario.method, scenario.backbone.quantization),
            "adapter": {"method": scenario.method, "settings": scenario.method_settings()},
            "aggregation": scenario.federation.aggregation,
            "strategy": scenario.federation.strategy,
            "participation": scenario.federation.participation,
            "secure_aggregation": scenario.secure_aggregation.enabled,
            "backbone": {"id": source.id, "sha256": source.sha256,
                         "quantization": scenario.backbone.quantization,
                         "precision": scenario.backbone.precision},
            "system_prompt": scenario.data.trained_system_prompt,
            "sites": sites}, encrypt=encrypt)

    if scenario.secure_aggregation.enabled:
        from fed_llama.server.secagg import SecAggFedAvg, run_secure_rounds

        if context is None:
            raise ValueError("secure aggregation needs the ServerApp's context")
        try:
            run_secure_rounds(grid, context, SecAggFedAvg(
                scenario, state, round_offset=done, on_train=on_train,
                on_evaluate=on_evaluate, checkpoint=save), total - done)
        except OSError as exc:
            _unwritable(exc, store)
        return

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            save(done + server_round, arrays.to_torch_state_dict())
            store.save_optimizer(done + server_round, export_state(strategy), encrypt)
        return None

    # not on the SecAgg+ path above: its evaluation waits for replies without a timeout, where
    # a reply a retried pull lost would hold the run for Flower's message TTL (12 h)
    grid = retry_pulls(grid)
    nodes = None
    if scenario.federation.participation == "cyclic":
        from fed_llama.server.cyclic import site_nodes

        nodes = site_nodes(grid, sites, scenario.federation.round_timeout)
    # what a site needs of the federation's settings travels with every message: a site on its
    # own machine reads no file of the aggregator's (fed_llama.config.run_settings)
    settings = {SETTINGS: federation_settings(scenario), BACKBONE_SHA256: source.sha256}
    strategy = build_strategy(scenario, sites, round_offset=done, on_train=on_train,
                              on_evaluate=on_evaluate,
                              on_carried_evaluation=on_carried_evaluation, security=guard,
                              site_nodes=nodes, settings=settings)
    if done and uses_server_state(strategy):
        saved = store.load_optimizer(done, decrypt)
        if saved is None:
            log.warning("--resume: no server optimizer state was saved after round %d; %s "
                        "starts its momentum afresh", done, scenario.federation.strategy)
        else:
            restore_state(strategy, saved, list(state))
            log.info("--resume: %s state restored from round %d",
                     scenario.federation.strategy, done)
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=total - done,
                       timeout=scenario.federation.round_timeout, evaluate_fn=checkpoint)
    except RoundFailed as exc:  # no checkpoint, no seal: the row says why, the run fails
        store.record(exc.row)
        log.error("%s", exc)
        raise
    except OSError as exc:
        _unwritable(exc, store)


def _unwritable(exc: OSError, store: RunStore) -> None:
    """Re-raise a failed write into the run folder as one line (every file there is written
    through a temporary file and a rename: what was there stays intact); anything else as is."""
    if not RunFolderError.concerns(exc, store):
        raise exc
    error = RunFolderError.unwritable(exc, store)
    log.error("%s", error)
    raise error from None


def _backbone_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def make_server_app(scenario: ScenarioConfig, store: RunStore, done: int) -> ServerApp:
    """A ServerApp bound to a scenario and a run folder (``fed-llama simulate``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, scenario, store, done, context)

    return app


def prepare_keys(scenario: ScenarioConfig, out: Path) -> ScenarioConfig:
    """A simulation's keys: made in ``<out>/keys`` when the scenario names no key folder."""
    sec = scenario.security
    if sec.envelopes and Path(sec.keys) == out / "keys":
        KeyFolder(out / "keys").ensure_simulation(scenario.site_names(), sec.kem)
    return scenario
