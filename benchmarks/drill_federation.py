"""One drill's federation on loopback: its folder and scenario, a real SuperLink (TLS,
SuperNode authentication) and N SuperNodes, ``flwr run`` submissions, and what the drills watch
(which round a site trains, the run's history rows, the SuperLink's and ServerApps' peak RSS).
``drills.py`` runs the drills on it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import drill_evidence as ev
from harness import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from loopback import Loopback, descendants_named

ROUNDS = 3
CLIENTAPP, SERVERAPP = "flwr-clientapp", "flwr-serverapp"


class DrillTimeout(RuntimeError):
    """A drill's wait ran past its deadline."""


class Drill:
    """One federation for one drill: its folder, scenario, SuperLink and SuperNodes."""

    def __init__(self, name: str, work: Path, sites: int, deadline: float,
                 federation: str = "", scenario: str | None = None) -> None:
        self.name, self.sites, self.deadline = name, sites, deadline
        self.folder = work / name
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.out = self.folder / "run"
        data = [work / "data" / f"site{i}.jsonl" for i in range(sites)]
        self.scenario = self.folder / "scenario.toml"
        self.scenario.write_text(scenario if scenario is not None else (
            f'[backbone]\nname = "{work / "backbone"}"\n'
            "[train]\nmax_steps = 2\nwarmup_steps = 1\nbatch_size = 4\n"
            "[evaluation]\nquestions = 0\n"
            f"[federation]\nrounds = {ROUNDS}\nsites = {json.dumps([str(p) for p in data])}\n"
            + federation))
        self.fed = Loopback(self.folder, work / "keys")
        self.peak_kb: dict[str, int] = {}
        self.submissions = 0
        self.stream_ended_early = 0
        """How many times ``flwr run --stream`` ended before its run (:meth:`finish`)."""

    @property
    def run_config(self) -> str:
        return f'scenario="{self.scenario}" out="{self.out}"'

    def node(self, i: int) -> subprocess.Popen[bytes]:
        return self.fed.start_supernode(f"supernode{i}", f"site{i}",
                                        f"partition-id={i} num-partitions={self.sites}")

    def restart(self, i: int, pause: float = 5) -> tuple[int, float]:
        """Start SuperNode ``i`` again until the SuperLink activates it (its log says
        ``SuperNode ID``): Flower 1.41 refuses to activate a node it still holds for online
        (exit code 305) until the killed one misses its heartbeats, so a site's service
        manager retries. Returns (attempts, seconds until it was activated)."""
        log = self.folder / f"supernode{i}.log"

        def activations() -> int:
            return log.read_text(errors="replace").count("SuperNode ID:") if log.is_file() else 0

        start, attempts, seen = time.monotonic(), 0, activations()
        while True:
            attempts += 1
            proc = self.node(i)
            while proc.poll() is None and activations() <= seen:
                if self.left() <= 0:
                    raise DrillTimeout(f"{self.name}: supernode{i} was never activated again")
                time.sleep(1)
            if activations() > seen:
                return attempts, round(time.monotonic() - start, 1)
            if self.left() <= 0:
                raise DrillTimeout(f"{self.name}: supernode{i} was never activated again")
            time.sleep(pause)

    def up(self) -> None:
        self.fed.start_superlink()
        for i in range(self.sites):
            self.fed.register(f"site{i}")
        for i in range(self.sites):
            self.node(i)
        self.fed.wait_online(self.sites, timeout=max(60, self.left()))

    def submit(self) -> subprocess.Popen[bytes]:
        """``flwr run --stream`` in the background (its log: ``flwr-run-<n>.log``)."""
        self.submissions += 1
        return self.fed.start(f"flwr-run-{self.submissions}",
                              self.fed.run_command(self.run_config))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def serverapps(self) -> list[int]:
        return descendants_named(self.fed.named["superlink"].pid, SERVERAPP)

    def training(self, i: int, server_round: int) -> bool:
        """SuperNode ``i`` runs a ClientApp started after round ``server_round`` was sealed
        (the ServerApp seals a round as it sends it, after the previous round's checkpoint)."""
        seal = self.out / "seals" / f"round-{server_round:03d}.json"
        if not seal.is_file():
            return False
        return bool(descendants_named(self.fed.named[f"supernode{i}"].pid, CLIENTAPP,
                                      since=seal.stat().st_mtime))

    def sealed(self, server_round: int) -> bool:
        """Round ``server_round`` was sent: the previous one is complete (checkpoint, row)."""
        return (self.out / "seals" / f"round-{server_round:03d}.json").is_file() and \
            server_round - 1 in ev.completed(self.out, self.rows())

    def rows(self) -> list[ev.Row]:
        return ev.history(self.out)

    def sample(self) -> None:
        """Keep the peak RSS (VmHWM) of the SuperLink and every ServerApp seen."""
        link = self.fed.named.get("superlink")
        pids = {"superlink": [link.pid] if link else [], "serverapp": self.serverapps()}
        for role, found in pids.items():
            for pid in found:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb[role] = max(self.peak_kb.get(role, 0), int(line.split()[1]))

    def wait(self, what: str, ready: Callable[[], bool], poll: float = 0.3) -> None:
        while not ready():
            if self.left() <= 0:
                raise DrillTimeout(f"{self.name}: timed out waiting for {what}")
            self.sample()
            time.sleep(poll)

    def finish(self, run: subprocess.Popen[bytes]) -> int:
        """``flwr run --stream``'s exit code once it has ended and, as its operator would
        check with ``flwr ls``, the run has too. Under load, Flower 1.41's log stream can end
        while the run goes on (the SuperLink's SQLite state answered the stream's request
        with "database is locked" in a 16-site drill): the drill then waits for the run,
        and says so in its notes (:attr:`stream_ended_early`)."""
        self.wait("the run to end", lambda: run.poll() is not None, poll=1)
        if self.unfinished():
            self.stream_ended_early += 1
            self.wait("the run to end after its log stream did",
                      lambda: not self.unfinished(), poll=5)
        return int(run.returncode)

    def unfinished(self) -> list[dict[str, object]]:
        """The runs ``flwr ls`` lists as not finished ([] when it cannot answer)."""
        return [r for r in self.fed.runs()
                if str(r.get("status", "")).startswith(("running", "starting", "pending"))]

    def abandon(self, run: subprocess.Popen[bytes], grace: float) -> str:
        """After a crash: let ``flwr run`` end by itself for ``grace`` s, else stop it as its
        user would (Ctrl-C); then ``flwr stop`` any run Flower still lists as running."""
        end = time.monotonic() + grace
        while run.poll() is None and time.monotonic() < end:
            self.sample()
            time.sleep(1)
        said = f"flwr run exited {run.returncode}" if run.poll() is not None else \
            f"flwr run still streaming after {grace:.0f} s: interrupted"
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            try:
                run.wait(timeout=20)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        for r in self.unfinished():
            self.fed.flwr("stop", str(r["run-id"]), "loopback", timeout=60)
            said += f"; flwr stop {r['run-id']} (was {r['status']})"
        return said

    def peaks_mb(self) -> dict[str, float]:
        return {k: round(v / 1024, 1) for k, v in sorted(self.peak_kb.items())}
