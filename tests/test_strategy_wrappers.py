"""The aggregator's concerns are wrappers around any strategy: around Flower's own FedAvg,
admission refuses a bad update with its reason and the envelopes a site's mod sends are
opened, and FedAvg's example-weighted mean of the rest comes out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fed_llama import wire
from fed_llama.client.security import envelope_mod
from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.crypto.keyring import KeyFolder
from fed_llama.server.admission import Admission
from fed_llama.server.envelopes import UpdateEnvelopes
from fed_llama.server.round_book import RoundBook
from fed_llama.server.security import ServerGuard
from fed_llama.server.strategy import build_strategy
from fed_llama.server.wrapper import innermost

pytestmark = pytest.mark.usefixtures("flower_task")

NAMES = ["cardiology", "oncology", "psychiatry"]
A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
G = torch.Generator().manual_seed(7)
CURRENT = {A: torch.randn(2, 5, generator=G), B: torch.zeros(6, 2)}
SITES = [{k: v + 0.01 * torch.randn(v.shape, generator=G) for k, v in CURRENT.items()}
         for _ in NAMES]
EXAMPLES = [10, 30, 60]


def _scenario(keys: Path | None = None) -> ScenarioConfig:
    security = {"envelopes": keys is not None, "seal_rounds": keys is not None}
    if keys is not None:
        security["keys"] = str(keys)  # type: ignore[assignment]
    return build_config(ScenarioConfig, {
        "federation": {"sites": [f"icd10:{n}" for n in NAMES]}, "security": security},
        source="test")


def _plain_reply(msg: Message, site: int, state: dict[str, torch.Tensor]) -> Message:
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(state), wire.METRICS: MetricRecord(
        {wire.NUM_EXAMPLES: EXAMPLES[site], wire.SITE: float(site), "train-loss": 1.0})}),
        reply_to=msg)


def _mean(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum(w / total * s[k] for w, s in zip(weights, states, strict=True))
            for k in CURRENT}  # type: ignore[misc]


def test_admission_around_flowers_fedavg_refuses_a_bad_update_and_averages_the_rest() -> None:
    book = RoundBook(NAMES)
    strategy = Admission(FedAvg(), book, _scenario())
    sent = list(strategy.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(),
                                         FakeGrid(3)))  # type: ignore[arg-type]
    poisoned = {A: SITES[2][A].clone(), B: SITES[2][B].clone()}
    poisoned[B][0, 0] = float("nan")
    replies = [_plain_reply(sent[0], 0, SITES[0]), _plain_reply(sent[1], 1, SITES[1]),
               _plain_reply(sent[2], 2, poisoned)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    expected = _mean(SITES[:2], EXAMPLES[:2])  # 10 and 30 examples: weights 1/4 and 3/4
    for key, value in arrays.to_torch_state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    assert book.refused == {sent[2].metadata.dst_node_id: "non-finite"}
    assert book.refusal_counts() == {"sites-refused": 1.0, "refused/non-finite": 1.0}


def test_the_envelope_mod_and_its_wrapper_carry_updates_around_flowers_fedavg(
        tmp_path: Path) -> None:
    scenario = _scenario(tmp_path / "keys")
    KeyFolder(tmp_path / "keys").ensure_simulation(NAMES, scenario.security.kem)
    guard = ServerGuard.load(scenario.security, KeyFolder(tmp_path / "keys"), "run-wrappers",
                             tmp_path / "seals")
    book = RoundBook(NAMES)
    strategy = UpdateEnvelopes(Admission(FedAvg(), book, scenario), book, guard)
    sent = list(strategy.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(),
                                         FakeGrid(3)))  # type: ignore[arg-type]
    assert all(m.content.config_records[wire.CONFIG][wire.RUN_ID] == "run-wrappers"
               for m in sent)
    mod = envelope_mod(scenario)
    replies = []
    for site, msg in enumerate(sent):
        context = Context(run_id=1, node_id=msg.metadata.dst_node_id,
                          node_config={"partition-id": site}, state=RecordDict(),
                          run_config={})
        trained: list[dict[str, torch.Tensor]] = []

        def train(m: Message, _: Context, site: int = site,
                  trained: list[dict[str, torch.Tensor]] = trained) -> Message:
            trained.append(m.content.array_records[wire.ARRAYS].to_torch_state_dict())
            return _plain_reply(m, site, SITES[site])

        reply = mod(msg, context, train)
        # the site trained on the sealed global adapter; only an envelope goes back
        assert all(torch.equal(trained[0][k], CURRENT[k]) for k in CURRENT)
        assert wire.ARRAYS not in reply.content.array_records
        assert isinstance(reply.content.config_records[wire.ENVELOPE][wire.ENVELOPE_BYTES],
                          bytes)
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    expected = _mean(SITES, EXAMPLES)
    for key, value in arrays.to_torch_state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    assert book.refused == {}
    assert set(book.bytes_up) == {m.metadata.dst_node_id for m in sent}


def test_the_envelope_mod_refuses_to_train_on_an_unsealed_adapter(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path / "keys")
    KeyFolder(tmp_path / "keys").ensure_simulation(NAMES, scenario.security.kem)
    flower = FedAvg(min_train_nodes=1, min_available_nodes=1)
    msg = next(iter(flower.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(
        {wire.RUN_ID: "run-unsealed"}), FakeGrid(1))))  # type: ignore[arg-type]
    context = Context(run_id=1, node_id=11, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    called = []
    with pytest.raises(Exception, match="sent no round seal"):
        envelope_mod(scenario)(msg, context, lambda m, c: called.append(m) or m)
    assert called == []  # nothing trained


def test_build_strategy_stacks_the_scenarios_wrappers_around_a_plain_strategy_class() -> None:
    scenario = build_config(ScenarioConfig, {"federation": {
        "sites": [f"icd10:{n}" for n in NAMES], "strategy": "fedyogi"}}, source="test")
    strategy = build_strategy(scenario, NAMES, round_offset=0, on_train=lambda *_: None,
                              on_evaluate=lambda *_: None)
    chain = []
    while strategy is not innermost(strategy):
        chain.append(type(strategy).__name__)
        strategy = strategy.strategy  # type: ignore[attr-defined]
    assert chain == ["FedLlama", "PackedArrays", "EvaluateEvery", "Admission"]
    assert type(strategy).__name__ == "AdapterFedYogi"
    assert type(strategy).__mro__[1].__name__ == "RunRound"


def test_a_carried_evaluation_rides_on_the_next_rounds_training_and_is_pooled_from_it(
        caplog: pytest.LogCaptureFixture) -> None:
    import math

    from fed_llama.server.evaluation import EvaluateEvery

    book = RoundBook(NAMES)
    carried: list[tuple[int, dict[str, float]]] = []
    skipped: list[int] = []
    strategy = EvaluateEvery(FedAvg(), book, every=2, rounds=4,
                             skipped=lambda r, _: skipped.append(r),
                             carried=lambda r, row: carried.append((r, row)))
    config = ConfigRecord()  # Flower hands every round the same record
    asked = []
    for server_round in (1, 2, 3, 4):
        sent = list(strategy.configure_train(server_round, ArrayRecord(CURRENT), config,
                                             FakeGrid(3)))  # type: ignore[arg-type]
        asked.append(sent[0].content.config_records[wire.CONFIG][wire.EVALUATE_FIRST])
        own = list(strategy.configure_evaluate(server_round, ArrayRecord(CURRENT),
                                               ConfigRecord(), FakeGrid(3)))  # type: ignore[arg-type]
        assert bool(own) == (server_round == 4)  # only the last round has messages of its own
    # round 2 (every 2nd) is evaluated by round 3's training messages; 1 and 3 are not due
    assert asked == [0, 0, 2, 0]
    losses, tokens = [2.0, 1.0, 4.0], [100.0, 300.0, 50.0]
    replies = []
    for site, msg in enumerate(sent):
        reply = _plain_reply(msg, site, SITES[site])
        reply.content[wire.CARRIED_EVALUATION] = MetricRecord({
            wire.SITE: float(site if site < 2 else 7),  # the third names no site: refused
            wire.HELDOUT_LOSS: losses[site], wire.HELDOUT_TOKENS: tokens[site]})
        replies.append(reply)
    strategy.configure_train(3, ArrayRecord(CURRENT), config, FakeGrid(3))  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(3, replies)
    # the updates aggregate as ever: Flower's FedAvg never sees the evaluations beside them
    assert arrays is not None
    expected = _mean(SITES, EXAMPLES)
    for key, value in arrays.to_torch_state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    [(evaluated, row)] = carried
    assert evaluated == 2 and row["sites-evaluated"] == 2 and row["evaluations-refused"] == 1
    assert row["pooled-loss"] == pytest.approx((2.0 * 100 + 1.0 * 300) / 400)
    assert row["cardiology/perplexity"] == pytest.approx(math.exp(2.0))
    # a round whose evaluation rides on the next ends with its training row only
    caplog.set_level("INFO", logger="fed_llama.server.evaluation")
    strategy.aggregate_evaluate(2, [])
    strategy.aggregate_evaluate(3, [])
    assert skipped == [2, 3]
    assert ("round 2/4: its held-out evaluation comes back with round 3's updates "
            "(federation.carry_evaluation)") in caplog.text
    assert ("round 3/4: not evaluated (held-out evaluation every 2 rounds and after the "
            "last)") in caplog.text


def test_carried_evaluations_need_a_hook_to_go_to() -> None:
    scenario = build_config(ScenarioConfig, {"federation": {
        "sites": [f"icd10:{n}" for n in NAMES], "carry_evaluation": True}}, source="test")
    with pytest.raises(ValueError, match="carry_evaluation needs a hook"):
        build_strategy(scenario, NAMES, round_offset=0, on_train=lambda *_: None,
                       on_evaluate=lambda *_: None)


def test_a_site_whose_carried_evaluation_fails_still_trains(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from fed_llama.client import app as client_app
    from fed_llama.client import site as site_ops

    scenario = _scenario()
    asked: list[int] = []

    def broken(sc: ScenarioConfig, site: int, state: dict[str, torch.Tensor]) -> None:
        asked.append(site)
        raise MemoryError("no room for the held-out batch")

    monkeypatch.setattr(site_ops, "evaluate", broken)
    # not asked: nothing evaluated
    assert client_app._carried_evaluation(ConfigRecord({wire.EVALUATE_FIRST: 0}), scenario, 1,
                                           CURRENT) is None and asked == []
    # asked, and it fails: no report, one warning, and the caller goes on to train
    assert client_app._carried_evaluation(ConfigRecord({wire.EVALUATE_FIRST: 4}), scenario, 1,
                                          CURRENT) is None and asked == [1]
    assert ("site oncology: the held-out evaluation of round 4's adapter failed (MemoryError: "
            "no room for the held-out batch); training goes on without it") in caplog.text
