"""``flwr run .`` works every time: Flower's own CLI builds the app package from this checkout,
starts its local simulation SuperLink, loads the ServerApp and the ClientApps (possibly at
once) and runs a tiny two-site federation; the run folder is where docs/architecture.md says
(a relative ``out`` under ``$FED_LLAMA_RUNS``), with every round in it. Five runs in a row."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import qa_records

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNS = 5

pytestmark = pytest.mark.deployment


@pytest.fixture
def flower_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    home = tmp_path / "flwr-home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's sockets: short paths
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FED_LLAMA_RUNS=str(tmp_path / "runs"), RAY_TMPDIR=str(ray_tmp),
               TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    yield env
    # `flwr run` leaves its local simulation SuperLink running: stop it and its children
    found = subprocess.run(["pgrep", "-f", f"FLWR_HOME={home}|{home}"], capture_output=True,
                           text=True).stdout.split()
    for pid in subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True,
                              text=True).stdout.split() + found:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if str(home).encode() in environ:
            os.killpg(os.getpgid(int(pid)), signal.SIGTERM)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_flwr_run_completes_five_runs_in_a_row(tiny_backbone: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                               write_jsonl, flower_env: dict[str, str]) -> None:
    sites = [write_jsonl(qa_records(12 + 4 * i), name=f"site{i}.jsonl") for i in range(2)]
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                        "[train]\nmax_steps = 2\nwarmup_steps = 1\nbatch_size = 4\n"
                        "[federation]\nrounds = 2\n"
                        f"sites = {json.dumps([str(s) for s in sites])}\n")
    for run in range(RUNS):
        started = time.monotonic()
        done = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config",
             f'scenario="{scenario}" out="tiny-{run}"',
             "--federation-config", "num-supernodes=2"],
            cwd=ROOT, env=flower_env, capture_output=True, text=True, timeout=600)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-3000:]
        folder = tmp_path / "runs" / f"tiny-{run}"  # where a relative out goes
        assert (folder / "history.json").is_file(), log[-4000:]
        history = json.loads((folder / "history.json").read_text())
        assert [row["round"] for row in history] == [1, 2], log[-3000:]
        assert all(row["sites-trained"] == 2 for row in history)
        assert (folder / "rounds" / "round-002" / "adapter_model.safetensors").is_file()
        assert "Traceback" not in log, log[-3000:]
        print(f"run {run}: {time.monotonic() - started:.1f} s")
