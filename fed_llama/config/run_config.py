"""Where a ``flwr run .`` federation finds its scenario and keeps its run folder.

Flower runs the ServerApp and the ClientApps from its own installed copy of the app (under
``$FLWR_HOME/apps``), not from the checkout ``flwr run`` was started in, and a simulation's
parties may import fed-llama from either. So the run folder cannot be relative to the code:

* ``out`` (run config): an absolute path, or a path relative to :func:`runs_home` —
  ``$FED_LLAMA_RUNS`` if set, else ``~/fed-llama-runs``. The ServerApp and every ClientApp
  compute it the same way, whichever copy of the code they run, and the ServerApp logs it.
* ``scenario`` (run config): an absolute path, or a path relative to the app's folder (the
  app package holds ``simulations/*.toml``, the same files as the checkout).

The scenario is read and checked by :func:`load_scenario`, the one validation both sides use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fed_llama.config.loader import apply_overrides, build_config, read_toml
from fed_llama.config.scenario import ScenarioConfig

APP_ROOT = Path(__file__).resolve().parents[2]
"""The folder that holds ``fed_llama/`` (the checkout, or Flower's installed app copy)."""
DEFAULT_SCENARIO = "simulations/hospitals-3.toml"
DEFAULT_OUT = "flwr-run"
RUNS_ENV = "FED_LLAMA_RUNS"


def runs_home() -> Path:
    """Where relative ``out`` folders of ``flwr run`` go: ``$FED_LLAMA_RUNS`` or
    ``~/fed-llama-runs``."""
    return Path(os.environ.get(RUNS_ENV) or "~/fed-llama-runs").expanduser().resolve()


def scenario_path(run_config: Mapping[str, Any]) -> Path:
    """The run config's ``scenario``: absolute, or relative to the app's folder."""
    value = Path(str(run_config.get("scenario", DEFAULT_SCENARIO))).expanduser()
    return value if value.is_absolute() else APP_ROOT / value


def run_folder(run_config: Mapping[str, Any]) -> Path:
    """The run config's ``out``: absolute, or relative to :func:`runs_home`."""
    value = Path(str(run_config.get("out", DEFAULT_OUT))).expanduser()
    return value if value.is_absolute() else runs_home() / value


def with_key_folder(scenario: ScenarioConfig, run_config: Mapping[str, Any]) -> ScenarioConfig:
    """The scenario with ``security.keys`` filled in: as given, or ``<out>/keys`` of the run
    config (``flwr run .`` on the Simulation Engine, where every party shares this machine)."""
    if scenario.security.keys:
        return scenario
    keys = run_folder(run_config) / "keys"
    return dataclasses.replace(scenario, security=dataclasses.replace(scenario.security,
                                                                      keys=str(keys)))


def load_scenario(path: Path, overrides: list[str] | None = None
                  ) -> tuple[ScenarioConfig, str]:
    """The scenario at ``path`` with ``--set`` overrides, every key checked, and its effective
    text (what a run folder keeps, and ``--resume`` compares)."""
    import tomli_w

    data = apply_overrides(read_toml(path), overrides or [])
    scenario = build_config(ScenarioConfig, data, source=str(path),
                            base_dir=path.resolve().parent)
    return scenario, tomli_w.dumps(data)
