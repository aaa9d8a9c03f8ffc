"""``fed-llama simulate``: a scenario on Flower's Simulation Engine (Ray), the sites in turn."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from fed_llama.common.notices import DropMessage
from fed_llama.config.adapter import method_label
from fed_llama.config.run_config import load_scenario as load_shared_scenario
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.config.train import ICD10_PREFIX
from fed_llama.errors import ConfigError, FedLlamaError
from fed_llama.server.checkpoint import RunStore
from fed_llama.server.outcome import RoundFailed

log = logging.getLogger(__name__)


def flower_environment(work: Path) -> None:
    """Settings every Flower process needs here: no runtime installs, no telemetry, local dirs."""
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    os.environ.setdefault("FLWR_HOME", str(work / "flwr-home"))
    os.environ.setdefault("RAY_TMPDIR", str(work / "ray"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray's future behaviour, chosen now (it no longer touches the accelerator variables of a
    # worker that asks for no GPU): without a choice, ray.init warns about the change
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


RUN_SIMULATION_NOTICE = "DEPRECATED FEATURE: The `run_simulation` function"
"""Flower 1.41 logs this on every call of ``run_simulation``, the Simulation Engine's Python
entry point that ``fed-llama simulate`` is built on; it is Flower's note to developers, not
news to a user of the command."""


def _stop_ray() -> None:
    """Make sure no Ray process outlives the run (Flower stops its actors; this is the net)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def load_scenario(path: Path, overrides: list[str] | None = None
                  ) -> tuple[ScenarioConfig, str]:
    """The scenario (:func:`fed_llama.config.run_config.load_scenario`) with its data sources
    checked too, which a simulation reads on this machine."""
    scenario, text = load_shared_scenario(path, overrides)
    problems = []
    for source in scenario.federation.sites:
        if source.startswith(ICD10_PREFIX):
            from fed_llama.data.icd10 import SITES

            if source[len(ICD10_PREFIX):] not in SITES:
                problems.append(f"federation.sites: unknown ICD-10 site {source!r} "
                                f"(choose from {', '.join(SITES)})")
        elif not Path(source).is_file():
            problems.append(f"federation.sites: data file {source!r} does not exist")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return scenario, text


def simulate(path: Path, out: Path, *, resume: bool = False,
             overrides: list[str] | None = None) -> RunStore:
    """Run (or resume) the scenario at ``path`` into ``out``; return the run folder."""
    scenario, text = load_scenario(path, overrides or [])
    if scenario.security.envelopes and scenario.security.keys:  # checked before any writing
        from fed_llama.crypto.keyring import KeyFolder

        problems = KeyFolder(Path(scenario.security.keys)).problems(scenario.site_names())
        if problems:
            raise ConfigError(f"security.keys: {'; '.join(problems)}")
    store = RunStore(out)
    done = store.start(text, resume, method=method_label(scenario.method,
                                                         scenario.backbone.quantization))
    if scenario.security.envelopes and not scenario.security.keys:
        from fed_llama.server.app import prepare_keys

        scenario = prepare_keys(dataclasses.replace(scenario, security=dataclasses.replace(
            scenario.security, keys=str(out / "keys"))), out)
    total = scenario.federation.rounds
    if done >= total:
        log.info("%s: all %d rounds already complete", out, total)
        return store
    log.info("simulating %d site(s) for %d round(s) (starting after round %d) into %s",
             len(scenario.site_names()), total, done, out)
    with tempfile.TemporaryDirectory(prefix="fed-llama-flwr-") as work:
        flower_environment(Path(work))
        from flwr.simulation import run_simulation

        from fed_llama.client.app import make_client_app
        from fed_llama.server.app import make_server_app

        flower_log = logging.getLogger("flwr")
        notice = DropMessage(RUN_SIMULATION_NOTICE)
        flower_log.addFilter(notice)
        try:
            run_simulation(
                server_app=make_server_app(scenario, store, done),
                client_app=make_client_app(scenario),
                num_supernodes=len(scenario.site_names()),
                # one site at a time with both cores: no oversubscription, deterministic order
                backend_config={"client_resources": {"num_cpus": os.cpu_count() or 1,
                                                     "num_gpus": 0.0},
                                "init_args": {"num_cpus": os.cpu_count() or 1}},
            )
        except RoundFailed as exc:  # too few sites trained (see fed_llama/server/outcome.py)
            raise FedLlamaError(f"{exc}. The run stopped after round {store.completed_rounds()} "
                                f"of {total}; fix the sites, then continue with --resume --out "
                                f"{out}") from None
        finally:
            flower_log.removeFilter(notice)
            _stop_ray()
    finished = store.completed_rounds()
    if finished < total:
        raise FedLlamaError(f"the simulation stopped after round {finished} of {total} (see the "
                            f"log above); continue it with --resume --out {out}")
    return store
