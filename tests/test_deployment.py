"""The same apps on Flower's Deployment Engine: a real SuperLink and two SuperNodes on loopback.

Each SuperNode's node config names its site (``partition-id``); ``flwr run .`` submits the app
with a run config that points at a tiny-model scenario. Two rounds run, signed and encrypted,
and every process the test started is stopped, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import qa_records

from fed_llama.adapter import read_manifest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60
                 ) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the SuperLink exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the SuperLink did not become healthy in {timeout} s:\n{log.read_text()}")


@pytest.fixture
def flower_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    yield env


def test_two_supernodes_run_two_rounds(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                       tmp_path: Path, flower_env: dict[str, str]) -> None:
    for i in range(2):
        write_jsonl(qa_records(16 + 4 * i), name=f"site{i}.jsonl")
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                        "[train]\nmax_steps = 2\nwarmup_steps = 1\nbatch_size = 4\n"
                        '[federation]\nrounds = 2\nsites = ["site0.jsonl", "site1.jsonl"]\n')
    out = tmp_path / "run"
    link_port = free_port()
    home = Path(flower_env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        proc = subprocess.Popen(cmd, env=flower_env, cwd=tmp_path, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        link = start("superlink", ["flower-superlink", "--insecure",
                                   "--disable-runtime-dependency-installation",
                                   "--host", "127.0.0.1", "--port", str(link_port),
                                   "--database", str(tmp_path / "state.db")])
        wait_healthy(link_port, link, logs[0])
        for i in range(2):
            start(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink",
                                    f"127.0.0.1:{link_port}", "--port", str(free_port()),
                                    "--node-config", f"partition-id={i} num-partitions=2"])
        run = subprocess.run(
            ["flwr", "run", str(ROOT), "loopback", "--stream", "--run-config",
             f'scenario="{scenario}" out="{out}"'],
            env=flower_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        detail = run.stdout[-3000:] + run.stderr[-3000:] + "".join(
            f"\n--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
        assert run.returncode == 0, detail
        history = json.loads((out / "history.json").read_text())
        assert [row["round"] for row in history] == [1, 2], detail
        assert all(row["sites-trained"] == 2 and row["sites-refused"] == 0 for row in history)
        manifest = read_manifest(out / "rounds" / "round-002")
        assert manifest["sites"] == ["site0", "site1"]
        assert (out / "seals" / "round-002.json").is_file()
    finally:
        for proc in procs:  # each in its own session: stop it with every child it started
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert all(p.poll() is not None for p in procs)
