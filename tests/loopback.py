"""Flower's Deployment Engine on loopback: a SuperLink with TLS and SuperNode authentication,
SuperNodes, ``flwr`` commands, and stopping every process started, whatever happens.

Shared by the deployment tests (``tests/test_deployment.py``, ``tests/test_share_nothing.py``)
and the fault drills (``benchmarks/drills.py``). Nothing is installed: the Flower executables
are the ones beside this Python, and ``flwr run`` packages the checkout this file is in.

Each process runs in a session of its own (``start_new_session``), so a signal to its group
reaches the children it started (a SuperNode's ``flower-superexec`` and ClientApps); the
SuperLink's ``flower-superexec`` runs in a session of its own and is found by its
``--parent-pid`` when everything is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class LoopbackError(RuntimeError):
    """A Flower process or command did not do what the federation needs (one line + logs)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of every Flower process: its own Flower home under ``home``, no
    telemetry, no update check, no runtime dependency installation (docs: flower-1.41 notes)."""
    env = dict(os.environ, FLWR_HOME=str(home / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def descendants_named(pid: int, name: str, since: float = 0) -> list[int]:
    """The pids of ``pid``'s descendants whose command line holds ``name`` (started at or
    after the time ``since``, in seconds since the epoch)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if name in " ".join(child.cmdline()) and child.create_time() >= since:
                found.append(child.pid)
        except psutil.Error:
            pass
    return found


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop every process started, each with its session, and any flower-superexec a
    SuperLink or SuperNode started (it runs in a session of its own, with --parent-pid)."""
    import psutil

    pids = {str(p.pid) for p in procs}
    orphans = [p for p in psutil.process_iter(["cmdline"])
               if any(a in pids for a in (p.info["cmdline"] or [])[-1:])
               and "flower-superexec" in " ".join(p.info["cmdline"] or [])]
    orphans += [c for o in orphans for c in _children(o)]
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for orphan in orphans:
        try:
            orphan.wait(timeout=10)
        except psutil.TimeoutExpired:
            orphan.kill()
        except psutil.NoSuchProcess:
            pass


def _children(proc: object) -> list[object]:
    import psutil

    try:
        return list(proc.children(recursive=True))  # type: ignore[attr-defined]
    except psutil.Error:
        return []


@dataclass
class Loopback:
    """One SuperLink on ``127.0.0.1:<port>`` (TLS, SuperNode auth, state in ``state.db``) and
    the SuperNodes started beside it; every file in ``folder``. The operator's Flower
    connection is called ``loopback``."""

    folder: Path
    keys: Path
    link_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    named: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fed_llama.crypto.transport import TlsFiles, init_tls

        self.tls = TlsFiles(self.keys)
        if not self.tls.cert.is_file():
            init_tls(self.keys)
        self.env = flower_env(self.folder)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.link_port}"\n'
            f'root-certificates = "{self.tls.ca_cert}"\n')

    # -- processes ---------------------------------------------------------------------------

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` as ``name`` (its log: ``<folder>/<name>.log``, appended to)."""
        log = self.folder / f"{name}.log"
        self.logs[name] = log
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, env=self.env, cwd=self.folder, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.named[name] = proc
        return proc

    def start_superlink(self, timeout: float = 60) -> subprocess.Popen[bytes]:
        """Start (or restart, on the same state database) the SuperLink; wait until healthy."""
        link = self.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.tls.ca_cert),
            "--ssl-certfile", str(self.tls.cert), "--ssl-keyfile", str(self.tls.key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.link_port),
            "--database", str(self.folder / "state.db")])
        self.wait_healthy(link, timeout)
        return link

    def wait_healthy(self, link: subprocess.Popen[bytes], timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if link.poll() is not None:
                raise LoopbackError(f"the SuperLink exited with {link.returncode}:\n"
                                    + self.tail("superlink"))
            try:
                if httpx.get(f"https://127.0.0.1:{self.link_port}/health", timeout=1,
                             verify=str(self.tls.ca_cert)).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise LoopbackError(f"the SuperLink did not become healthy in {timeout} s:\n"
                            + self.tail("superlink"))

    def register(self, site: str) -> None:
        """``flwr supernode register`` the node key of ``site`` (made if missing)."""
        from fed_llama.crypto.transport import init_node

        if not self.tls.node_public(site).is_file():
            init_node(self.keys, site)
        reg = self.flwr("supernode", "register", str(self.tls.node_public(site)), "loopback")
        if reg.returncode != 0:
            raise LoopbackError(f"registering {site}'s node key failed: "
                                f"{(reg.stdout + reg.stderr).strip()}")

    def start_supernode(self, name: str, site: str, node_config: str,
                        *extra: str) -> subprocess.Popen[bytes]:
        """A SuperNode authenticated with ``site``'s node key."""
        from fed_llama.crypto.transport import init_node

        if not self.tls.node_key(site).is_file():
            init_node(self.keys, site)
        return self.start(name, [
            "flower-supernode", "--root-certificates", str(self.tls.ca_cert),
            "--superlink", f"127.0.0.1:{self.link_port}",
            "--auth-supernode-private-key", str(self.tls.node_key(site)),
            "--port", str(free_port()), "--node-config", node_config, *extra])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal ``name``'s whole process group (it and the children it started)."""
        proc = self.named[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def close(self) -> None:
        stop(self.procs)

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the operator's commands -------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["flwr", *args], env=self.env, cwd=self.folder,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(["flwr", *args], 124, str(exc.stdout or ""),
                                               f"timed out after {timeout} s")

    def run_command(self, run_config: str) -> list[str]:
        """``flwr run`` of this checkout on the loopback connection, streaming its logs."""
        return ["flwr", "run", str(ROOT), "loopback", "--stream", "--run-config", run_config]

    def submit(self, run_config: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``flwr run`` to its end (or ``timeout``: return code 124)."""
        cmd = self.run_command(run_config)
        try:
            return subprocess.run(cmd, env=self.env, cwd=self.folder, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(cmd, 124, str(exc.stdout or ""),
                                               str(exc.stderr or "") + f"\ntimed out ({timeout} s)")

    def runs(self) -> list[dict[str, object]]:
        """``flwr ls``: the SuperLink's runs ([] when it cannot answer)."""
        ls = self.flwr("ls", "loopback", "--format", "json", timeout=60)
        try:
            runs: list[dict[str, object]] = json.loads(ls.stdout)["runs"]
        except (ValueError, KeyError, TypeError):
            return []
        return runs

    def online_nodes(self) -> int:
        ls = self.flwr("supernode", "ls", "loopback", "--format", "json", timeout=60)
        try:
            nodes = json.loads(ls.stdout)["nodes"]
        except (ValueError, KeyError, TypeError):
            return 0
        return sum(n.get("status") == "online" for n in nodes)

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            if time.monotonic() > deadline:
                raise LoopbackError(f"fewer than {count} SuperNodes online after {timeout} s")
            time.sleep(2)

    def tail(self, name: str, chars: int = 2500) -> str:
        log = self.logs.get(name)
        return log.read_text(errors="replace")[-chars:] if log and log.is_file() else ""

    def detail(self, run: subprocess.CompletedProcess[str] | None = None) -> str:
        said = (run.stdout[-3000:] + run.stderr[-3000:]) if run is not None else ""
        return said + "".join(f"\n--- {name}.log\n{self.tail(name, 2000)}"
                              for name in self.logs)
