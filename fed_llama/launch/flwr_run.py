"""The apps ``flwr run .`` loads (``[tool.flwr.app.components]`` in pyproject.toml).

The scenario and the run folder come from the run config (``[tool.flwr.app.config]``,
``--run-config``): see :mod:`fed_llama.config.run_config` for where relative paths lead. The
ServerApp starts the run or resumes it after its last complete round. On the Simulation Engine
every ClientApp reads the same scenario; on a real site (a SuperNode with ``site-config``) the
site's own config and the federation's settings in the messages decide (see
docs/deployment.md).

Flower may load both apps at once, in two threads: this module and the two it builds on import
nothing heavy at import time, and the package graph has no import cycle
(``tests/test_architecture.py``).
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_llama.client.app import make_client_app

log = logging.getLogger(__name__)

server_app = ServerApp()
client_app = make_client_app()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation the run config names."""
    from fed_llama.config.adapter import method_label
    from fed_llama.config.run_config import (
        load_scenario,
        run_folder,
        scenario_path,
        with_key_folder,
    )
    from fed_llama.launch.flower_errors import one_line_flower_errors
    from fed_llama.server.app import prepare_keys, run_federation
    from fed_llama.server.checkpoint import RunStore

    one_line_flower_errors()  # a bad scenario or an unwritable run folder: one line, no trace
    path, out = scenario_path(context.run_config), run_folder(context.run_config)
    scenario, text = load_scenario(path)
    log.info("scenario %s; run folder %s", path, out)
    store = RunStore(out)
    done = store.start(text, resume=True, method=method_label(
        scenario.method, scenario.backbone.quantization))
    scenario = prepare_keys(with_key_folder(scenario, context.run_config), store.out)
    run_federation(grid, scenario, store, done, context)
