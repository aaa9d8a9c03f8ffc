"""Two drills on the Deployment Engine that need more than a signal (run by ``drills.py``):

- ``secagg``: Flower's SecAgg+ workflow with 5 SuperNodes; one is SIGKILLed in round 1 while
  its ClientApp trains and masks its update (the third message of its round: setup, share
  keys, then collect masked vectors), then started again. The unmasked round-1 aggregate must
  equal the plain example-weighted mean of the 4 survivors' updates within
  :data:`SECAGG_TOLERANCE`, computed by the same sites in a plain ``fed-llama simulate`` run
  (the killed site is the last, so the survivors keep their partition ids and seeds).
- ``disk``: the run folder is a bind mount that is remounted read-only while round 2 trains
  (the drills run as root, whom file modes do not stop): the ServerApp stops with one line
  naming the folder, round 1's checkpoint stays intact, and once the folder is writable again
  the same ``flwr run`` resumes and completes, 0 rounds lost or applied twice.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import tomllib
from typing import Any

import drill_evidence as ev
from drill_federation import CLIENTAPP, ROUNDS, Drill
from loopback import descendants_named

Outcome = tuple[dict[str, bool], list[int], str, dict[str, Any]]

SECAGG_TOLERANCE = 1e-4
"""Largest difference from the plain mean (SecAgg+ quantizes values and weights to 2^22
levels; ``max_weight = 100`` suits these sites' 16-24 examples: tests/test_secure_aggregation)."""
SECAGG_FED = ("round_timeout = 120\n[security]\nenvelopes = false\nseal_rounds = false\n"
              "[secure_aggregation]\nenabled = true\nmax_weight = 100\ntimeout = 120\n")
TRAINING_STAGE = 3
"""The victim's ClientApp to kill: SecAgg+'s third message of the round (its update is
trained and masked then)."""


def secagg(d: Drill) -> Outcome:
    victim = d.sites - 1
    pid = d.fed.named[f"supernode{victim}"].pid
    started = time.time()
    run = d.submit()
    seen: list[int] = []

    def at_training_stage() -> bool:
        seen.extend(p for p in descendants_named(pid, CLIENTAPP, since=started) if p not in seen)
        return len(seen) >= TRAINING_STAGE

    d.wait("the victim's training message of round 1", at_training_stage, poll=0.05)
    d.fed.kill(f"supernode{victim}")
    time.sleep(3)
    attempts, back = d.restart(victim)
    code = d.finish(run)
    rows = {int(r["round"]): r for r in d.rows()}
    r1 = rows.get(1, {})
    diff = _plain_difference(d, survivors=d.sites - 1)
    checks = {"flwr run exit 0": code == 0,
              "round 1 unmasked with the survivors": r1.get("sites-trained") == d.sites - 1,
              f"aggregate = plain mean of the survivors within {SECAGG_TOLERANCE:g}":
                  diff is not None and diff < SECAGG_TOLERANCE,
              "rounds 2-3 with every site": all(rows.get(r, {}).get("sites-trained") == d.sites
                                                for r in range(2, ROUNDS + 1))}
    note = (f"supernode{victim} killed at its ClientApp {TRAINING_STAGE} of round 1 (collect "
            f"masked vectors); round 1: {r1.get('sites-trained')} trained, "
            f"{r1.get('sites-failed')} failed, {r1.get('round-seconds')} s; largest difference "
            f"from the plain mean of the {d.sites - 1} survivors: "
            f"{'n/a' if diff is None else f'{diff:.2e}'}; activated again {back} s after its "
            f"restart ({attempts} start(s))")
    return checks, [], note, {}


def _plain_difference(d: Drill, survivors: int) -> float | None:
    """Round 1 of a plain run (Simulation Engine, no masks) of the first ``survivors`` sites,
    against the drill's round-1 aggregate: the largest absolute difference."""
    secure = d.out / "rounds" / "round-001" / "adapter_model.safetensors"
    if not secure.is_file():
        return None
    spec = tomllib.loads(d.scenario.read_text())
    sites = spec["federation"]["sites"][:survivors]
    plain = d.folder / "plain.toml"
    plain.write_text(f'[backbone]\nname = "{spec["backbone"]["name"]}"\n'
                     "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                           for k, v in spec["train"].items())
                     + "[evaluation]\nquestions = 0\n"
                     f"[federation]\nrounds = 1\nsites = {json.dumps(sites)}\n"
                     "[security]\nenvelopes = false\nseal_rounds = false\n")
    with open(d.folder / "plain.log", "wb") as log:
        subprocess.run([sys.executable, "-m", "fed_llama.cli.main", "-q", "simulate",
                        str(plain), "--out", str(d.folder / "plain")], check=True,
                       stdout=log, stderr=subprocess.STDOUT, timeout=max(60, d.left()))
    from fed_llama.server.checkpoint import RunStore

    a, b = RunStore(d.out).load_round(1), RunStore(d.folder / "plain").load_round(1)
    if a.keys() != b.keys():
        return None
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def disk(d: Drill) -> Outcome:
    d.out.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(d.out), str(d.out))
    try:
        run = d.submit()
        d.wait("round 2's training", lambda: any(d.training(i, 2) for i in range(d.sites)),
               poll=0.1)
        _mount("-o", "remount,ro,bind", str(d.out))
        code = d.finish(run)
        said = d.fed.tail(f"flwr-run-{d.submissions}", 10**6)
        lines = [line for line in said.splitlines() if "cannot be written" in line]
        intact = ev.completed(d.out, d.rows())
        _mount("-o", "remount,rw,bind", str(d.out))
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            _mount("-o", "remount,rw,bind", str(d.out))
        subprocess.run(["umount", str(d.out)], capture_output=True, timeout=30)
    before = [r for r in d.rows() if int(r["round"]) in intact]
    resumed = d.finish(d.submit())
    after = d.rows()
    checks = {"the read-only run stopped": code != 0 or len(intact) < ROUNDS,
              "one line names the run folder": bool(lines) and str(d.out) in lines[0],
              "round 1 intact": intact == [1],
              "resumed run exit 0": resumed == 0,
              "every round trained by all sites": len(after) == ROUNDS and all(
                  r.get("sites-trained") == d.sites for r in after)}
    shown = lines[0].split("ERROR", 1)[-1].strip(" :") if lines else "no such line"
    note = (f"run folder remounted read-only in round 2; flwr run exited {code}; the line: "
            f"{shown[:160]}; rounds intact {intact}; writable again, the same flwr run "
            f"exited {resumed}")
    return checks, ev.rerun_rounds(before, after), note, {}
