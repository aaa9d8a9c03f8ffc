"""The same apps on Flower's Deployment Engine: a real SuperLink and two SuperNodes on loopback.

The transport is secured with what ``fed-llama keys`` makes: TLS (a CA and the SuperLink's
certificate) and SuperNode authentication (each site's node key, registered with
``flwr supernode register``); a node whose key was never registered is turned away. Each
SuperNode's node config names its site (``partition-id``); ``flwr run .`` submits the app with
a run config that points at a tiny-model scenario. Two rounds run, signed and encrypted, and
every process the test started is stopped, whatever happens.
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


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, ca: Path,
                 timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the SuperLink exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"https://127.0.0.1:{port}/health", timeout=1,
                         verify=str(ca)).is_success:
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


@pytest.mark.parametrize("participation", ["all", "cyclic"])
def test_two_authenticated_supernodes_run_two_rounds_over_tls(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, flower_env: dict[str, str],
        participation: str) -> None:
    """With ``cyclic`` participation the ServerApp first asks each SuperNode its site (a query
    message over the same TLS link), then each round goes to one site in turn."""
    from fed_llama.crypto.transport import init_node, init_tls

    keys = tmp_path / "keys"
    tls = init_tls(keys)
    for site in ("site0", "site1", "intruder"):
        init_node(keys, site)
    for i in range(2):
        write_jsonl(qa_records(16 + 4 * i), name=f"site{i}.jsonl")
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                        "[train]\nmax_steps = 2\nwarmup_steps = 1\nbatch_size = 4\n"
                        '[federation]\nrounds = 2\nsites = ["site0.jsonl", "site1.jsonl"]\n'
                        f'participation = "{participation}"\n')
    out = tmp_path / "run"
    link_port = free_port()
    home = Path(flower_env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{tls.ca_cert}"\n')
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
        link = start("superlink", ["flower-superlink", "--ssl-ca-certfile", str(tls.ca_cert),
                                   "--ssl-certfile", str(tls.cert), "--ssl-keyfile",
                                   str(tls.key), "--enable-supernode-auth",
                                   "--disable-runtime-dependency-installation",
                                   "--host", "127.0.0.1", "--port", str(link_port),
                                   "--database", str(tmp_path / "state.db")])
        wait_healthy(link_port, link, logs[0], tls.ca_cert)
        for site in ("site0", "site1"):
            reg = subprocess.run(["flwr", "supernode", "register", str(tls.node_public(site)),
                                  "loopback"], env=flower_env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
            assert reg.returncode == 0, reg.stdout + reg.stderr

        def node(name: str, site: str, partition: int, *extra: str) -> subprocess.Popen[bytes]:
            return start(name, ["flower-supernode", "--root-certificates", str(tls.ca_cert),
                                "--superlink", f"127.0.0.1:{link_port}",
                                "--auth-supernode-private-key", str(tls.node_key(site)),
                                "--port", str(free_port()), "--node-config",
                                f"partition-id={partition} num-partitions=2", *extra])

        # its key was never registered: the SuperLink refuses to activate it
        intruder = node("intruder", "intruder", 0, "--max-retries", "1")
        for i in range(2):
            node(f"supernode{i}", f"site{i}", i)
        run = subprocess.run(
            ["flwr", "run", str(ROOT), "loopback", "--stream", "--run-config",
             f'scenario="{scenario}" out="{out}"'],
            env=flower_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        detail = run.stdout[-3000:] + run.stderr[-3000:] + "".join(
            f"\n--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
        assert run.returncode == 0, detail
        history = json.loads((out / "history.json").read_text())
        assert [row["round"] for row in history] == [1, 2], detail
        trained = 2 if participation == "all" else 1
        assert all(row["sites-trained"] == trained and row["sites-refused"] == 0
                   for row in history), detail
        if participation == "cyclic":  # site0's turn, then site1's
            assert ["site0/train-loss" in row for row in history] == [True, False]
            assert ["site1/train-loss" in row for row in history] == [False, True]
        manifest = read_manifest(out / "rounds" / "round-002")
        assert manifest["sites"] == ["site0", "site1"]
        assert (out / "seals" / "round-002.json").is_file()
        intruder.wait(timeout=60)
        refusal = logs[1].read_text()
        assert intruder.returncode != 0, refusal
        assert "Exit Code: 305" in refusal and "Failed to activate SuperNode" in refusal, refusal
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
