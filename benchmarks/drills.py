"""The Deployment Engine under load and faults: a real SuperLink (TLS, SuperNode
authentication) and N SuperNodes on loopback, the run submitted with ``flwr run`` as an operator
would, faults injected with process signals.

Drills (tiny random LLaMA; ``--only`` picks some, in this order):

- ``scale``: 16 SuperNodes, 3 rounds; Flower's overhead per round (round wall time minus the
  slowest site's training and evaluation) and the SuperLink's and ServerApp's peak RSS. Both
  scale drills run as a deployment should, with ``federation.carry_evaluation``: a round's
  evaluation rides on the next round's training messages, one ClientApp process per site per
  round (the last round evaluates in messages of its own). A run that fails
  (under this load Flower 1.41's SuperLink can answer the ServerApp with "database is
  locked") is submitted again once, as its operator would, and resumes; the note says so.
- ``scale-real``: 4 SuperNodes on the default backbone (SmolLM2-135M), four ICD-10 hospitals
  doing the main job's local work, 3 rounds: the same figures as ``scale``.
- ``scale-real-no-carry``: the same without ``carry_evaluation``, as the baseline: each round
  evaluates in messages of its own, two ClientApp processes per site per round.
- ``site-crash``: 4 sites, ``min_sites = 3``; SIGKILL one SuperNode while it trains round 2
  and start it again: round 2 completes with the others, nothing of the killed site is
  admitted, and it trains round 3.
- ``serverapp-crash``: SIGKILL the ServerApp process while round 2 trains; submit the run again
  with the same ``out`` (the ServerApp resumes after the last complete round).
- ``superlink-crash``: SIGKILL the SuperLink while round 2 trains; start it again on its state
  database, submit the run again with the same ``out``.
- ``connection-lost``: SIGKILL a SuperNode as round 1 ends and start it again (retrying until
  Flower activates it again): it trains again, at the latest in the last round.
- ``connection-stall``: SIGSTOP a SuperNode for 25 s as round 1 ends (a connection that stalls
  and comes back, within Flower's heartbeat patience), then SIGCONT: it is served round 2.
- ``straggler``: one site replies 300 s late in round 2 (``[attack] slow_sites``; the others
  take about 30 s): round 2 ends at its ``round_timeout`` with the other three, and nothing of
  the late site is admitted in it.
- ``secagg``: 5 sites on Flower's SecAgg+ workflow, one SIGKILLed while it trains round 1:
  the aggregate equals the plain mean of the survivors (``drill_privacy_disk.py``).
- ``crash-resume``: CI's subset, one federation of 4: a SuperNode SIGKILLed in round 2 (it
  stays down), the ServerApp in round 3, the run submitted again: it resumes and completes.
- ``disk``: the run folder turns read-only while round 2 trains: one line, round 1 intact,
  and the same ``flwr run`` resumes once it is writable (``drill_privacy_disk.py``).

Each drill's verdict is computed from the run folder (history rows, checkpoints, the round-seal
chain, see ``drill_evidence.py``) and the processes' exits. Results go to
``benchmarks/results/drills.json`` after each drill; drills already there are skipped unless
``--force``. ``python benchmarks/report.py`` puts the table into docs/benchmarks.md.

    python benchmarks/drills.py         # scale: ~25 min on 2 cores; each other drill 4-10 min
    python benchmarks/drills.py --only site-crash --force
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import drill_evidence as ev
from drill_federation import ROUNDS, Drill, DrillTimeout
from drill_privacy_disk import SECAGG_FED, disk, secagg
from harness import ROOT, add_json_argument, environment, markdown_table, write_results

sys.path.insert(0, str(ROOT / "tests"))
from conftest import build_tiny_backbone, qa_records

__all__ = ["ROUNDS", "Drill", "DrillTimeout", "prepare", "run_drill"]

# -- the drills: each returns (checks, rounds run twice, note, extra results) ------------------

Outcome = tuple[dict[str, bool], list[int], str, dict[str, Any]]


def scale(d: Drill) -> Outcome:
    code = d.finish(d.submit())
    before = d.rows()
    resubmitted = ""
    if len(before) < ROUNDS:  # the run failed: its operator submits it again, as documented
        failed = [str(r.get("status")) for r in d.fed.runs()]
        code = d.finish(d.submit())  # the same out: the ServerApp resumes after the last round
        resubmitted = (f"; the run ended after {len(before)} round(s) ({', '.join(failed)}): "
                       f"resubmitted once, as its operator would")
    rows = d.rows()
    per_round = ev.overhead(rows)
    checks = {"flwr run exit 0": code == 0,
              f"every round trained by all {d.sites}": len(rows) == ROUNDS and all(
                  r.get("sites-trained") == d.sites for r in rows)}
    peaks = d.peaks_mb()
    note = overhead_note(per_round, peaks) + resubmitted
    extra = {"overhead": [{"drill": d.name, **o} for o in per_round], "peak_rss_mb": peaks}
    return checks, ev.rerun_rounds(before, rows), note, extra


def overhead_note(per_round: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    """The scale drills' note: overhead per round, Flower's own part where the sites report
    their load times, and the peak RSS."""
    shown = ", ".join(f"r{o['round']} {o['overhead_s']:.1f}/{o['round_s']:.1f} s "
                      f"({100 * o['overhead_share']:.0f}%)" for o in per_round)
    note = f"overhead per round (round s minus slowest site's train and evaluate s): {shown}"
    parts = [  # (the key every round needs, what it is, each round's figure)
        ("flower_s", "less the sites' backbone loads too",
         lambda o: f"{o['flower_s']:.1f} s ({100 * o['flower_share']:.0f}%)"),
        ("handover_s", "of which Flower's hand-over and replies (polls, ClientApp process "
         "starts) / the aggregator's own time",
         lambda o: f"{o['handover_s'] + o['reply_s']:.1f} s ({100 * o['messaging_share']:.0f}%)"
                   f" / {o['aggregator_s']:.1f} s"),
        ("process_start_s", "of the hand-over, inside the new ClientApp process (importing "
         "Flower, installing and loading the app)",
         lambda o: f"{o['process_start_s']:.1f} of {o['handover_s']:.1f} s")]
    for key, what, figure in parts:
        if per_round and all(key in o for o in per_round):
            note += f"; {what}: " + ", ".join(f"r{o['round']} {figure(o)}" for o in per_round)
    return note + "; peak RSS MB: " + ", ".join(f"{k} {v}" for k, v in peaks.items())


def site_crash(d: Drill, victim: int = 1) -> Outcome:
    run = d.submit()
    d.wait("the victim to train round 2", lambda: d.training(victim, 2), poll=0.1)
    d.fed.kill(f"supernode{victim}")
    time.sleep(3)
    attempts, back = d.restart(victim)  # the site's machine is back
    code = d.finish(run)
    rows = {int(r["round"]): r for r in d.rows()}
    name = f"site{victim}"
    r2, r3 = rows.get(2, {}), rows.get(3, {})
    checks = {"flwr run exit 0": code == 0,
              "round 2 completed with the others": r2.get("sites-trained") == d.sites - 1,
              "round 2's row counts 1 failed site": r2.get("sites-failed") == 1,
              "nothing of the killed site admitted in round 2": f"{name}/train-loss" not in r2,
              "the restarted site trained round 3": f"{name}/train-loss" in r3
              and r3.get("sites-trained") == d.sites}
    note = (f"round 2: {r2.get('sites-trained')} trained, {r2.get('sites-failed')} failed, "
            f"{r2.get('round-seconds')} s; the killed SuperNode was activated again {back} s "
            f"after its restart ({attempts} start(s)); round 3: {r3.get('sites-trained')} trained")
    return checks, [], note, {}


def aggregator_crash(d: Drill, target: str) -> Outcome:
    run = d.submit()
    d.wait("round 2's training", lambda: any(d.training(i, 2) for i in range(d.sites)),
           poll=0.1)
    killed_pid = d.serverapps()
    before = d.rows()
    if target == "serverapp":
        for pid in killed_pid:
            os.kill(pid, signal.SIGKILL)
        said = d.abandon(run, grace=90)
    else:
        d.fed.kill("superlink")
        time.sleep(2)
        d.fed.start_superlink()  # the same state database
        said = "SuperLink restarted"
        end = time.monotonic() + 90  # does the old ServerApp outlive it, and finish the run?
        while time.monotonic() < end and any(Path(f"/proc/{p}").exists() for p in killed_pid):
            time.sleep(1)
        alive = [p for p in killed_pid if Path(f"/proc/{p}").exists()]
        if alive:
            said += "; the old ServerApp still alive after 90 s: killed"
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        said += "; " + d.abandon(run, grace=5)
        d.fed.wait_online(d.sites, timeout=max(60, d.left()))
    done_before = ev.completed(d.out, before)
    before = [r for r in before if int(r["round"]) in done_before]
    code = d.finish(d.submit())  # the same out: the ServerApp resumes after the last round
    after = d.rows()
    twice = ev.rerun_rounds(before, after)
    ran = re.search(r"Number of rounds: (\d+)", d.fed.tail(f"flwr-run-{d.submissions}", 10**6))
    checks = {"resumed run exit 0": code == 0,
              "every round trained by all sites": len(after) == ROUNDS and all(
                  r.get("sites-trained") == d.sites for r in after)}
    statuses = [str(r.get("status")) for r in sorted(d.fed.runs(), key=lambda r: str(
        r.get("pending-at", "")))]
    note = (f"killed {target} in round 2 (rounds complete before: {done_before}); {said}; "
            f"resubmitted: Flower ran {ran.group(1) if ran else '?'} round(s); "
            f"flwr ls: {', '.join(statuses)}")
    return checks, twice, note, {}


def connection_lost(d: Drill, victim: int = 2) -> Outcome:
    run = d.submit()
    d.wait("round 2 to be sent", lambda: d.sealed(2), poll=0.1)
    d.fed.kill(f"supernode{victim}")
    time.sleep(2)
    attempts, back = d.restart(victim)
    code = d.finish(run)
    rows = {int(r["round"]): r for r in d.rows()}
    served = [r for r in sorted(rows) if f"site{victim}/train-loss" in rows[r]]
    checks = {"flwr run exit 0": code == 0,
              "the restarted site trained the last round": ROUNDS in served
              and rows[ROUNDS].get("sites-trained") == d.sites}
    r2 = rows.get(2, {})
    return checks, [], f"killed as round 1 ended; activated again {back} s after the restart " \
        f"({attempts} start(s)); it trained rounds {served}; round 2: " \
        f"{r2.get('sites-trained')} trained, {r2.get('round-seconds')} s", {}


def connection_stall(d: Drill, victim: int = 2, pause: float = 25) -> Outcome:
    """The connection cut without the process dying: SIGSTOP the SuperNode (and its
    children) for ``pause`` s, under Flower's heartbeat patience, then SIGCONT."""
    run = d.submit()
    d.wait("round 2 to be sent", lambda: d.sealed(2), poll=0.1)
    pgid = d.fed.named[f"supernode{victim}"].pid
    os.killpg(pgid, signal.SIGSTOP)
    time.sleep(pause)
    os.killpg(pgid, signal.SIGCONT)
    code = d.finish(run)
    rows = {int(r["round"]): r for r in d.rows()}
    r2 = rows.get(2, {})
    checks = {"flwr run exit 0": code == 0,
              "the stalled site was served round 2": f"site{victim}/train-loss" in r2
              and r2.get("sites-trained") == d.sites}
    return checks, [], f"stopped {pause:.0f} s as round 1 ended; round 2: " \
        f"{r2.get('sites-trained')} trained, {r2.get('round-seconds')} s", {}


def straggler(d: Drill, victim: int = 3) -> Outcome:
    """Site ``victim`` replies :data:`SLOW_SECONDS` late in round 2 ([attack] slow_sites): the
    round goes on with the others when its timeout passes, and nothing of the late site is
    admitted in that round."""
    code = d.finish(d.submit())
    rows = {int(r["round"]): r for r in d.rows()}
    name = f"site{victim}"
    r1, r2, r3 = rows.get(1, {}), rows.get(2, {}), rows.get(3, {})
    seconds = float(r2.get("round-seconds", SLOW_SECONDS))
    checks = {"flwr run exit 0": code == 0,
              f"round 1 trained by all {d.sites}": r1.get("sites-trained") == d.sites,
              "round 2 completed with the others": r2.get("sites-trained") == d.sites - 1,
              "round 2 did not wait for the late site": seconds < SLOW_SECONDS,
              "nothing of the late site admitted in round 2": f"{name}/train-loss" not in r2,
              "round 3 completed": r3.get("sites-trained", 0) >= d.sites - 1}
    refused = sum(float(r.get("sites-refused", 0)) for r in rows.values())
    note = (f"{name} {SLOW_SECONDS:.0f} s late in round 2 (round_timeout 90 s): round 2 took "
            f"{seconds:.1f} s with {r2.get('sites-trained')} sites, {r2.get('sites-failed')} "
            f"failed; round 3: {r3.get('sites-trained')} trained"
            f"{'' if f'{name}/train-loss' in r3 else f' ({name} still late)'}; late updates "
            f"refused: {refused:.0f} (Flower delivers no reply after its round's timeout)")
    return checks, [], note, {}


def crash_resume(d: Drill, victim: int = 1) -> Outcome:
    """CI's subset (``tests/test_drills.py``), one federation of 4: SIGKILL a SuperNode while
    it trains round 2 (it stays down: the rounds go on with 3), then the ServerApp while
    round 3 trains; stop the run as its user would and submit it again: it resumes after
    round 2 and completes."""
    run = d.submit()
    d.wait("the victim to train round 2", lambda: d.training(victim, 2), poll=0.1)
    d.fed.kill(f"supernode{victim}")
    others = [i for i in range(d.sites) if i != victim]
    d.wait("round 3's training", lambda: any(d.training(i, 3) for i in others), poll=0.1)
    for pid in d.serverapps():
        os.kill(pid, signal.SIGKILL)
    before = d.rows()
    said = d.abandon(run, grace=5)
    done_before = ev.completed(d.out, before)
    code = d.finish(d.submit())  # the same out: the ServerApp resumes after round 2
    rows = {int(r["round"]): r for r in d.rows()}
    r2, r3 = rows.get(2, {}), rows.get(3, {})
    name = f"site{victim}"
    checks = {"resumed run exit 0": code == 0,
              "round 2 completed with the others": r2.get("sites-trained") == d.sites - 1,
              "nothing of the killed site admitted": f"{name}/train-loss" not in r2
              and f"{name}/train-loss" not in r3,
              "rounds 1-2 complete when the aggregator was killed": done_before == [1, 2],
              "round 3 completed after the resume": r3.get("sites-trained") == d.sites - 1}
    note = (f"{name} killed in round 2: {r2.get('sites-trained')} trained, "
            f"{r2.get('round-seconds')} s; serverapp killed in round 3 (rounds complete "
            f"before: {done_before}); {said}; resubmitted: round 3 with "
            f"{r3.get('sites-trained')} sites")
    before = [r for r in before if int(r["round"]) in done_before]
    return checks, ev.rerun_rounds(before, d.rows()), note, {}


SLOW_SECONDS = 300.0
"""How late the straggler drill's slow site replies: past round 2's two timed phases (train
and evaluate, 90 s each), about 10x a site's own round on this loopback federation."""
CRASH_FED = "min_sites = 3\nround_timeout = 90\n"
REAL_SITES = ["icd10:cardiology", "icd10:oncology", "icd10:psychiatry", "icd10:neurology"]
REAL_SCENARIO = (
    '[backbone]\nname = "smollm2-135m"\n'
    "[train]\nmax_steps = 20\nbatch_size = 8\nlr = 0.003\nwarmup_steps = 2\nthreads = 1\n"
    "[data]\nmax_heldout_records = 64\n[evaluation]\nquestions = 0\n"
    f"[federation]\nrounds = {ROUNDS}\nsites = {json.dumps(REAL_SITES)}\n"
    "round_timeout = 1800\ncarry_evaluation = true\n")
"""``scale-real``: 20 local steps of 8 examples a round on the default backbone, four ICD-10
hospitals, held-out perplexity on 64 records per site. Each site's torch uses one thread: the
four SuperNodes share this host's cores, where each would have a machine of its own."""
SCENARIOS = {"scale-real": REAL_SCENARIO,
             "scale-real-no-carry": REAL_SCENARIO.replace("carry_evaluation = true",
                                                          "carry_evaluation = false")}


DRILLS: dict[str, tuple[int, str, Callable[[Drill], Outcome]]] = {
    "scale": (16, "round_timeout = 900\ncarry_evaluation = true\n", scale),
    "scale-real": (len(REAL_SITES), "", scale),
    "scale-real-no-carry": (len(REAL_SITES), "", scale),
    "site-crash": (4, CRASH_FED, site_crash),
    "serverapp-crash": (4, CRASH_FED, lambda d: aggregator_crash(d, "serverapp")),
    "superlink-crash": (4, CRASH_FED, lambda d: aggregator_crash(d, "superlink")),
    "connection-lost": (4, CRASH_FED, connection_lost),
    "connection-stall": (4, CRASH_FED, connection_stall),
    "straggler": (4, CRASH_FED + f'[attack]\nslow_sites = ["site3"]\n'
                  f"slow_seconds = {SLOW_SECONDS}\nslow_rounds = [2]\n", straggler),
    "secagg": (5, SECAGG_FED, secagg),
    "crash-resume": (4, "min_sites = 3\nround_timeout = 40\n", crash_resume),
    "disk": (4, CRASH_FED, disk),
}


def run_drill(name: str, work: Path, timeout: float) -> tuple[ev.Row, dict[str, Any]]:
    sites, federation, body = DRILLS[name]
    start = time.monotonic()
    d = Drill(name, work, sites, start + timeout, federation, SCENARIOS.get(name))
    extra: dict[str, Any] = {}
    try:
        d.up()
        checks, twice, note, extra = body(d)
    except Exception as exc:  # a timeout or a process that would not start: the drill fails
        checks, twice, note = {"drill ran to its end": False}, [], f"{type(exc).__name__}: {exc}"
        (d.folder / "failure.log").write_text(f"{exc}\n{d.fed.detail()}")
    finally:
        d.fed.close()
    wall = time.monotonic() - start
    keys = d.out / "keys"
    if d.stream_ended_early:
        note += (f"; flwr run's log stream ended {d.stream_ended_early} time(s) before its run "
                 "(the drill waited for the run, as flwr ls showed it)")
    row = ev.drill_row(name, sites, d.out, ROUNDS, wall, checks, twice,
                       keys=keys if keys.is_dir() else None, note=note)
    return row, extra


def prepare(work: Path, sites: int) -> None:
    """The tiny backbone and every site's data, once per work folder."""
    if not (work / "backbone" / "config.json").is_file():
        build_tiny_backbone(work / "backbone")
    (work / "data").mkdir(parents=True, exist_ok=True)
    for i in range(sites):
        path = work / "data" / f"site{i}.jsonl"
        if not path.is_file():
            path.write_text("".join(json.dumps(r) + "\n" for r in qa_records(16 + 4 * (i % 3))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(DRILLS), default=list(DRILLS))
    parser.add_argument("--force", action="store_true", help="run drills already in --json")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per drill (default: 2400 for scale, 900 for straggler, "
                        "600 for the others)")
    parser.add_argument("--work", default="/tmp/fed-llama-drills",
                        help="where the drills' SuperLinks, SuperNodes and runs live")
    add_json_argument(parser, "drills.json")
    args = parser.parse_args()
    path, work = Path(args.json), Path(args.work)
    saved: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    rows: dict[str, ev.Row] = {r["drill"]: r for r in saved.get("rows", [])}
    overhead = [o for o in saved.get("overhead", [])]
    prepare(work, max(s for s, _, _ in DRILLS.values()))
    for name in args.only:
        if name in rows and not args.force:
            print(f"{name}: in {path.name} already (--force runs it again)")
            continue
        timeout = args.timeout or {"scale": 2400, "scale-real": 2400,
                                   "scale-real-no-carry": 2400,
                                   "straggler": 900}.get(name, 600)
        print(f"{name}: running (at most {timeout:.0f} s)", flush=True)
        row, extra = run_drill(name, work, timeout)
        rows[name] = row
        if "overhead" in extra:
            overhead = [o for o in overhead if o["drill"] != name] + extra["overhead"]
        if "peak_rss_mb" in extra:
            peaks = saved.get("peak_rss_mb", {})
            if "superlink" in peaks:  # results written before peaks were kept per drill
                peaks = {"scale": peaks}
            saved["peak_rss_mb"] = {**peaks, name: extra["peak_rss_mb"]}
        print(f"{name}: {row['result']} ({row['wall s']} s) {row['note']}", flush=True)
        ordered = [rows[n] for n in DRILLS if n in rows]
        write_results(path, {"rounds": ROUNDS, "model": "tiny random LLaMA (tests/conftest.py)"
                             "; scale-real: SmolLM2-135M",
                             **({"peak_rss_mb": saved["peak_rss_mb"]}
                                if "peak_rss_mb" in saved else {}),
                             "rows": ordered, "overhead": overhead}, environment())
    ordered = [rows[n] for n in DRILLS if n in rows]
    print(markdown_table(ordered, ev.COLUMNS))
    return 0 if all(r["result"] == "PASS" for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
