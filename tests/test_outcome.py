"""Honest outcomes: a round in which too few sites trained writes no checkpoint and no seal,
stops the run with each site's own reason, and leaves a history row that says so."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FakeGrid, qa_records
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fed_llama.cli.main import main
from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.server.outcome import FAILED, RoundFailed, reply_reason
from fed_llama.server.strategy import build_strategy

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
CURRENT = {A: torch.ones(2, 5), B: torch.zeros(6, 2)}
REFUSAL = "<class 'fed_llama.errors.ConfigError'>:<'site 'site1' refuses the run: rank 4'>"


def test_a_sites_reason_is_its_exception_message_in_one_line() -> None:
    assert reply_reason("<class 'ValueError'>:<'site x refuses:\n  lora.r 4, not 8'>") == (
        "site x refuses: lora.r 4, not 8")
    assert reply_reason("<class 'KeyError'>:<''>") == "KeyError"
    assert reply_reason("Message unavailable") == "Message unavailable"
    simulated = ("<class 'ray.exceptions.RayTaskError'>:<'ray::ClientAppActor.run() ...\n"
                 "  File \"ray_actor.py\", line 65, in run\n"
                 "Exception ClientAppException occurred. Message: site x drops out'>")
    assert reply_reason(simulated) == "site x drops out"
    assert len(reply_reason("<class 'E'>:<'" + "x" * 5000 + "'>")) == 300


def _sent(**federation: Any) -> tuple[Any, dict[int, dict[str, float]], list[Message]]:
    """A strategy of two sites, the history rows it records, and its round-1 messages."""
    scenario = build_config(ScenarioConfig, {"federation": {
        "sites": ["icd10:cardiology", "icd10:oncology"], **federation},
        "security": {"envelopes": False, "seal_rounds": False}}, source="test")
    rows: dict[int, dict[str, float]] = {}
    strategy = build_strategy(scenario, scenario.site_names(), round_offset=0,
                              on_train=lambda r, row: rows.__setitem__(r, row),
                              on_evaluate=lambda *_: None)
    sent = list(strategy.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(),
                                         FakeGrid(2)))  # type: ignore[arg-type]
    return strategy, rows, sent


def _update(msg: Message, examples: int, site: int) -> Message:
    """Site ``site``'s reply to ``msg``: the global adapter moved by 0.01."""
    state = {k: v + 0.01 for k, v in CURRENT.items()}
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(
        {"num-examples": examples, "site": site, "train-loss": 1.0})}), reply_to=msg)


def _round(replies: list[int | str], **federation: Any
           ) -> tuple[dict[int, dict[str, float]], Any]:
    """One training round of two sites; each reply an update (its example count) or a
    ClientApp's error (its reason, as Flower words it)."""
    strategy, rows, sent = _sent(**federation)
    out = [_update(msg, reason, i) if isinstance(reason, int)
           else Message(Error(code=2, reason=reason), reply_to=msg)
           for i, (msg, reason) in enumerate(zip(sent, replies, strict=False))]
    return rows, strategy.aggregate_train(1, out)


@pytest.mark.usefixtures("flower_task")
def test_a_round_no_site_trained_in_stops_with_every_sites_reason() -> None:
    with pytest.raises(RoundFailed) as caught:
        _round(["<class 'RuntimeError'>:<'site 'site0' has no data'>", REFUSAL])
    message = str(caught.value)
    assert message.startswith("round 1: 0 of 2 site(s) trained") and "\n" not in message
    # Flower samples the nodes in any order: each reason is named with its node
    assert re.search(r"node (11|22): site 'site0' has no data", message)
    assert re.search(r"node (11|22): site 'site1' refuses the run: rank 4", message)
    row = caught.value.row
    assert (row["round"], row["sites-trained"], row["sites-failed"], row["sites-sent"]) == (
        1, 0, 2, 2)
    assert row[FAILED] == message


@pytest.mark.usefixtures("flower_task")
def test_with_min_sites_0_every_site_sent_the_round_must_reply() -> None:
    with pytest.raises(RoundFailed, match=r"1 of 2 site\(s\) trained, every site sent the "
                       r"round must reply .*; node (11|22): site 'site1' refuses"):
        _round([8, REFUSAL])


@pytest.mark.usefixtures("flower_task")
def test_with_min_sites_the_round_goes_on_with_the_quorum() -> None:
    rows, (arrays, _) = _round([8, REFUSAL], min_sites=1)
    assert arrays is not None
    assert (rows[1]["sites-trained"], rows[1]["sites-failed"], rows[1]["sites-refused"]) == (
        1, 1, 0)


@pytest.mark.usefixtures("flower_task")
def test_a_site_that_never_replies_counts_as_failed() -> None:
    with pytest.raises(RoundFailed,
                       match=r"node (11|22): no reply within federation.round_timeout"):
        _round([8], min_sites=2)


@pytest.mark.usefixtures("flower_task")
def test_a_node_lost_mid_round_counts_once_with_the_superlinks_reason() -> None:
    # Flower's SuperLink answers for a node it lost with an error reply from itself (node 1),
    # not from the node: that is the failure of the node that sent nothing, counted once
    strategy, rows, sent = _sent(min_sites=1)
    good = _update(sent[0], 8, 0)
    lost = Message(Error(code=2, reason="Node Unavailable"), reply_to=sent[1])
    lost.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink sends it: its own id
    arrays, _ = strategy.aggregate_train(1, [good, lost])
    assert arrays is not None
    assert (rows[1]["sites-trained"], rows[1]["sites-failed"]) == (1, 1)


@pytest.mark.usefixtures("flower_task")
def test_updates_the_aggregator_refuses_are_named_by_their_reason() -> None:
    with pytest.raises(RoundFailed, match=r"0 of 2 .* 2 needed \(federation.min_sites = 2\); "
                       r"update\(s\) refused by the aggregator: malformed x2"):
        _round([0, 0], min_sites=2)  # updates that report no examples: malformed


def test_a_simulated_run_in_which_no_site_trains_fails_and_writes_no_round(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(2):
        write_jsonl(qa_records(8), name=f"site{i}.jsonl")
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                        "[train]\nmax_steps = 1\nwarmup_steps = 0\nbatch_size = 4\n"
                        '[federation]\nrounds = 2\nsites = ["site0.jsonl", "site1.jsonl"]\n'
                        '[attack]\ndrop_sites = ["site0", "site1"]\n')
    out = tmp_path / "run"
    assert main(["-q", "simulate", str(scenario), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "round 1: 0 of 2 site(s) trained" in err, err
    for site in ("site0", "site1"):
        assert f"site {site} drops out of round 1 ([attack] drop_sites)" in err, err
    assert "--resume" in err
    assert not (out / "rounds").exists() or not any((out / "rounds").iterdir())
    assert not (out / "seals" / "round-002.json").exists()  # round 1's output is never sealed
    [row] = json.loads((out / "history.json").read_text())
    assert (row["round"], row["sites-trained"], row["sites-failed"]) == (1, 0, 2)
    assert row[FAILED] in err
