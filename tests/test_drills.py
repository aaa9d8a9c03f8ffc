"""The fault drills' verdicts come from evidence: history rows, checkpoints, the round-seal chain
and the processes' exits (``benchmarks/drill_evidence.py``), never from a hard-coded result.
Two drills run end to end on a real SuperLink and four SuperNodes (marked deployment): CI's
crash-and-resume, and the connection stall (also marked slow)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import load_benchmark

sys.modules.setdefault("drill_evidence", load_benchmark("drill_evidence"))
sys.modules.setdefault("drill_federation", load_benchmark("drill_federation"))
sys.modules.setdefault("drill_privacy_disk", load_benchmark("drill_privacy_disk"))
ev = sys.modules["drill_evidence"]


def row(r: int, **extra: object) -> dict[str, object]:
    return {"round": r, "sites-trained": 4.0, "sites-refused": 0.0, **extra}


def test_a_round_without_a_completed_row_and_checkpoint_is_lost(tmp_path: Path) -> None:
    for r in (1, 3):
        (tmp_path / "rounds" / f"round-{r:03d}").mkdir(parents=True)
        (tmp_path / "rounds" / f"round-{r:03d}" / "adapter_config.json").write_text("{}")
    rows = [row(1), row(2), row(3, failed="round 3: 1 of 4 site(s) trained")]
    done = ev.completed(tmp_path, rows)
    assert done == [1]  # round 2 has no checkpoint, round 3 failed
    assert ev.rounds_lost(done, 3) == 2


def test_a_completed_round_run_again_after_a_restart_counts_as_applied_twice() -> None:
    before = [row(1, **{"round-seconds": 10.0})]
    assert ev.rerun_rounds(before, [row(1, **{"round-seconds": 10.0}), row(2)]) == []
    assert ev.rerun_rounds(before, [row(1, **{"round-seconds": 12.5}), row(2)]) == [1]
    assert ev.rerun_rounds([], [row(1), row(2), row(2)]) == [2]
    # a round that had failed before the restart may run again
    assert ev.rerun_rounds([row(1, failed="x")], [row(1)]) == []
    # a NaN metric read twice is the same row; a round whose carried evaluation came back
    # after the snapshot was not run again
    nan = row(1, **{"round-seconds": 10.0, "dp-epsilon": float("nan")})
    assert ev.rerun_rounds([nan], [row(1, **{"round-seconds": 10.0,
                                             "dp-epsilon": float("nan")})]) == []
    assert ev.rerun_rounds(before, [row(1, **{"round-seconds": 10.0,
                                              "pooled-perplexity": 5.0})]) == []


def test_the_verdict_names_every_check_that_failed() -> None:
    assert ev.verdict({"flwr run exit 0": True, "0 rounds lost": True}) == "PASS"
    assert ev.verdict({"flwr run exit 0": False, "0 rounds lost": True, "x": False}) == \
        "FAIL: flwr run exit 0, x"
    assert ev.verdict({}).startswith("FAIL")


def test_flowers_overhead_is_the_round_minus_its_slowest_sites_train_and_evaluate() -> None:
    rows = [row(1, **{"round-seconds": 20.0, "site0/train-seconds": 4.0,
                      "site1/train-seconds": 5.0, "site0/evaluate-seconds": 3.0,
                      "site1/evaluate-seconds": 2.0}),
            row(2, **{"round-seconds": 10.0, "site0/train-seconds": 6.0}),  # no evaluation
            row(3)]  # no timings: no overhead row
    assert ev.overhead(rows) == [
        {"round": 1, "round_s": 20.0, "slowest_train_s": 5.0, "slowest_evaluate_s": 3.0,
         "overhead_s": 12.0, "overhead_share": 0.6},
        {"round": 2, "round_s": 10.0, "slowest_train_s": 6.0, "slowest_evaluate_s": 0.0,
         "overhead_s": 4.0, "overhead_share": 0.4}]


def test_flowers_own_part_also_leaves_out_the_sites_backbone_loads() -> None:
    """Where sites report load-seconds, ``flower_s`` is the round less the slowest site's load
    plus training and the slowest site's load plus evaluation (not always the same site)."""
    timed = row(1, **{"round-seconds": 100.0,
                      "a/train-seconds": 50.0, "a/train-load-seconds": 5.0,
                      "b/train-seconds": 40.0, "b/train-load-seconds": 20.0,
                      "a/evaluate-seconds": 10.0, "a/evaluate-load-seconds": 3.0,
                      "b/evaluate-seconds": 12.0, "b/evaluate-load-seconds": 4.0})
    [entry] = ev.overhead([timed])
    assert entry["overhead_s"] == 100.0 - 50.0 - 12.0
    assert entry["slowest_train_load_s"] == 20.0
    assert entry["flower_s"] == 100.0 - (40.0 + 20.0) - (12.0 + 4.0)
    assert entry["flower_share"] == 0.24


def test_the_clocks_split_a_round_into_hand_over_site_reply_and_aggregator_time() -> None:
    """Each phase's critical path is its last site to finish: Flower's hand-over (sent ->
    that site started), the site's time, the reply's way back (done -> received); what the
    round holds beyond its phases is the aggregator's own."""
    timed = row(1, **{"round-seconds": 100.0, "a/train-seconds": 30.0, "b/train-seconds": 35.0,
                      "train-sent-at": 1000.0, "train-received-at": 1060.0,
                      "a/train-started-at": 1004.0, "a/train-done-at": 1050.0,
                      "b/train-started-at": 1002.0, "b/train-done-at": 1055.0,
                      "evaluate-sent-at": 1065.0, "evaluate-received-at": 1095.0,
                      "a/evaluate-started-at": 1070.0, "a/evaluate-done-at": 1090.0})
    [entry] = ev.overhead([timed])
    # train: b finished last (1055): hand-over 2, site 53, reply 5; evaluate: 5, 20, 5
    assert (entry["handover_s"], entry["last_site_s"], entry["reply_s"]) == (7.0, 73.0, 10.0)
    assert entry["aggregator_s"] == 100.0 - 60.0 - 30.0
    assert entry["messaging_share"] == 0.17
    assert "handover_s" not in ev.overhead([row(2, **{"round-seconds": 10.0,
                                                      "a/train-seconds": 6.0})])[0]
    note = load_benchmark("drills").overhead_note([entry], {"superlink": 200.0})
    assert "Flower's hand-over and replies" in note and "r1 17.0 s (17%) / 10.0 s" in note
    # where the sites say when their process started, the hand-over splits at that point
    timed.update({"b/train-process-started-at": 1001.0, "a/evaluate-process-started-at": 1068.5})
    [entry] = ev.overhead([timed])
    assert entry["process_start_s"] == 1.0 + 1.5 and entry["handover_s"] == 7.0
    assert "r1 2.5 of 7.0 s" in load_benchmark("drills").overhead_note([entry], {})
    # a process older than the message (a simulation's actor) started nothing for it
    timed["b/train-process-started-at"] = 900.0
    assert "process_start_s" not in ev.overhead([timed])[0]
    # an evaluated round without the evaluation's clocks is not split at all
    del timed["a/evaluate-done-at"]
    assert "handover_s" not in ev.overhead([timed])[0]


def test_a_drill_row_fails_on_a_lost_round_whatever_its_own_checks_say(tmp_path: Path) -> None:
    (tmp_path / "history.json").write_text(json.dumps([row(1)]))
    (tmp_path / "rounds" / "round-001").mkdir(parents=True)
    (tmp_path / "rounds" / "round-001" / "adapter_config.json").write_text("{}")
    out = ev.drill_row("site-crash", 4, tmp_path, 2, 12.34, {"flwr run exit 0": True}, [])
    assert (out["rounds done"], out["rounds lost"], out["rounds applied twice"]) == (1, 1, 0)
    assert out["result"] == "FAIL: 0 rounds lost"
    assert list(out)[:len(ev.COLUMNS)] == ev.COLUMNS


def passed_end_to_end(work: Path, drill: str, timeout: float) -> None:
    """Run ``drill`` on four SuperNodes in ``work``: it passes, every round done once."""
    drills = load_benchmark("drills")
    drills.prepare(work, 4)
    result, _ = drills.run_drill(drill, work, timeout=timeout)
    assert result["result"] == "PASS", result
    assert (result["rounds done"], result["rounds lost"], result["rounds applied twice"]) == (
        drills.ROUNDS, 0, 0)


@pytest.mark.deployment  # in CI: about 3 minutes on 2 cores (docs/deployment.md)
def test_a_site_crash_then_an_aggregator_crash_lose_no_round(tmp_path: Path) -> None:
    """CI's drill (``crash-resume``) end to end on a SuperLink with TLS and SuperNode auth and
    four SuperNodes: one SuperNode SIGKILLed while it trains round 2, then the ServerApp while
    round 3 trains; the run submitted again resumes after round 2 and completes."""
    passed_end_to_end(tmp_path, "crash-resume", timeout=600)


@pytest.mark.deployment
@pytest.mark.slow  # three rounds on four SuperNodes: about 3 minutes on 2 cores
def test_a_supernode_whose_connection_stalls_is_served_the_round_in_progress(
        tmp_path: Path) -> None:
    """The ``connection-stall`` drill end to end: a SuperLink with TLS and SuperNode auth, four
    SuperNodes, ``flwr run``; one SuperNode stops for 25 s as round 2 is sent, then goes on."""
    passed_end_to_end(tmp_path, "connection-stall", timeout=500)
    out = tmp_path / "connection-stall" / "run"
    ok, said, _ = ev.seal_chain(out, out / "keys")
    assert ok, said
    # a seal swapped for another round's breaks the chain
    shutil.copy(out / "seals" / "round-001.json", out / "seals" / "round-002.json")
    ok, said, _ = ev.seal_chain(out, out / "keys")
    assert not ok and "round-002.json" in said, said


def test_a_process_knows_when_it_started() -> None:
    from fed_llama.client.clock import process_started_at

    started = process_started_at()
    assert started is not None and 0 <= time.time() - started < 24 * 3600
    assert process_started_at(Path("/nonexistent")) is None  # no /proc: no figure, no error


def test_a_carried_evaluation_counts_with_the_training_message_that_did_it() -> None:
    """With ``federation.carry_evaluation`` a site evaluates the previous round's adapter and
    then trains in one message: the phase's slowest site is the slowest at both together."""
    carried = row(2, **{"round-seconds": 100.0,
                        "a/train-seconds": 50.0, "a/carried-evaluate-seconds": 20.0,
                        "a/train-load-seconds": 4.0,
                        "b/train-seconds": 60.0, "b/carried-evaluate-seconds": 5.0,
                        "b/train-load-seconds": 6.0})
    [entry] = ev.overhead([carried])
    assert (entry["slowest_train_s"], entry["slowest_evaluate_s"]) == (70.0, 0.0)
    assert entry["overhead_s"] == 30.0
    assert entry["flower_s"] == 100.0 - (50.0 + 20.0 + 4.0)
