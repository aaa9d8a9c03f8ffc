"""A normal ``fed-llama simulate`` prints our progress and results, and nothing that a
third-party library warns about (run as a user runs it: a fresh process, Ray workers and all)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import qa_records

# what a library's notice looks like on the console: a Python warning ("...: FutureWarning: ..."),
# a logger's warning (ours are "WARNING fed_llama.<module>: ..."), Flower's coloured
# "WARNING :" lines, a traceback, or bitsandbytes' missing-kernel line (logged bare in a worker)
THIRD_PARTY = re.compile(r"Warning:|WARNING|Traceback|DEPRECATED|Failed to load", re.IGNORECASE)
OURS = re.compile(r"^WARNING fed_llama\.")


def test_a_short_simulation_prints_no_third_party_warning(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    for i in range(2):
        write_jsonl(qa_records(12), name=f"site{i}.jsonl")
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                        "[train]\nmax_steps = 2\nwarmup_steps = 1\nbatch_size = 4\n"
                        '[federation]\nrounds = 1\nsites = ["site0.jsonl", "site1.jsonl"]\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, "-m", "fed_llama.cli.main", "simulate", str(scenario),
         "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    # the run happened and said so: our progress and our results
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["round"] == 1
    assert "fed_llama.launch.simulate: simulating 2 site(s) for 1 round(s)" in printed
    # one evaluated round: its perplexity, and the training loss of the run's rounds
    assert re.search(r"1 round\(s\) in .*: training loss \d+\.\d{3} in round 1 -> \d+\.\d{3} "
                     r"in round 1; pooled held-out perplexity \d+\.\d\d after round 1;",
                     done.stdout), done.stdout
    noise = [line for line in printed.splitlines()
             if THIRD_PARTY.search(line) and not OURS.match(line)]
    assert noise == []


def test_only_the_named_notice_is_dropped_and_only_from_its_logger() -> None:
    from fed_llama.common.notices import (
        BNB_KERNEL_LOGGER,
        FLOWER_ACTOR_NOTICE,
        quiet_bitsandbytes,
        quiet_flower_actor,
    )

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.name}: {record.getMessage()}")

    keep = Keep()
    flower, bnb = logging.getLogger("flwr"), logging.getLogger(BNB_KERNEL_LOGGER)
    for logger in (flower, bnb):
        logger.addHandler(keep)
    try:
        quiet_flower_actor()
        quiet_flower_actor()  # idempotent: one filter however often a worker asks
        quiet_bitsandbytes()
        flower.warning("Manually terminating %s", "ClientAppActor")
        flower.warning("Node %s failed to reply", 3)
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: ...")
        bnb.warning("Failed to load something else")
        logging.getLogger("fed_llama.x").warning("Manually terminating ours")
    finally:
        for logger in (flower, bnb):
            logger.removeHandler(keep)
    assert seen == ["flwr: Node 3 failed to reply",
                    f"{BNB_KERNEL_LOGGER}: Failed to load something else"]
    assert sum(getattr(f, "prefix", None) == FLOWER_ACTOR_NOTICE for f in flower.filters) == 1


def test_a_fed_llama_error_that_flower_logs_is_one_line_and_others_keep_their_trace() -> None:
    """A ServerApp on the Deployment Engine that raises (a bad scenario, an unwritable run
    folder): Flower logs the exception with its traceback; the operator sees one line."""
    from flwr.common.logger import log

    from fed_llama.errors import ConfigError
    from fed_llama.launch.flower_errors import OneLineErrors, one_line_flower_errors

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    flower = logging.getLogger("flwr")
    flower.addHandler(keep)
    try:
        one_line_flower_errors()
        one_line_flower_errors()  # added once however often a ServerApp starts in a process
        assert sum(isinstance(f, OneLineErrors) for f in flower.filters) == 1
        log(logging.ERROR, "%s raised an exception", "ServerApp",
            exc_info=ConfigError("scenario.toml: federation.rounds must be at least 1; got 0"))
        log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=KeyError("bug"))
    finally:
        flower.removeHandler(keep)
        flower.filters = [f for f in flower.filters if not isinstance(f, OneLineErrors)]
    ours, other = records
    assert ours.getMessage() == ("fed-llama: error: scenario.toml: federation.rounds must be at "
                                 "least 1; got 0")
    assert ours.exc_info is None
    assert other.getMessage() == "ServerApp raised an exception" and other.exc_info is not None
