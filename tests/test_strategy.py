"""Flower's strategies on top of the LoRA-aware aggregation, against hand computation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fed_llama.client.site import proximal_term
from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.errors import ConfigError
from fed_llama.server.checkpoint import RunStore
from fed_llama.server.optimizer_state import export_state, restore_state, uses_server_state
from fed_llama.server.strategy import ADAPTIVE_SERVER_LR, build_strategy
from fed_llama.server.wrapper import innermost

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


pytestmark = pytest.mark.usefixtures("flower_task")


def _strategy(round_offset: int = 0, site_nodes: dict[str, int] | None = None,
              **federation: Any) -> Strategy:
    scenario = build_config(ScenarioConfig, {"federation": {
        "sites": ["icd10:cardiology", "icd10:oncology"], **federation}}, source="test")
    return build_strategy(scenario, scenario.site_names(), round_offset=round_offset,
                          on_train=lambda *_: None, on_evaluate=lambda *_: None,
                          site_nodes=site_nodes)


def _round(strategy: Strategy, current: dict[str, torch.Tensor],
           sites: list[dict[str, torch.Tensor]], examples: list[int], server_round: int = 1
           ) -> tuple[dict[str, torch.Tensor], list[Message]]:
    sent = list(strategy.configure_train(server_round, ArrayRecord(current), ConfigRecord(),
                                         FakeGrid(2)))  # type: ignore[arg-type]
    replies = [Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({
        "num-examples": n, "site": i, "train-loss": 1.0, "train-seconds": 1.0})}),
        reply_to=msg) for i, (msg, state, n) in enumerate(zip(sent, sites, examples,
                                                               strict=True))]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return arrays.to_torch_state_dict(), sent


def _adapters() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    current = {A: torch.randn(2, 5, generator=g), B: torch.zeros(6, 2)}
    sites = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in current.items()}
             for _ in range(2)]
    return current, sites


def test_fedavg_returns_the_example_weighted_mean() -> None:
    current, sites = _adapters()
    new, _ = _round(_strategy(), current, sites, [10, 30])
    for k in current:
        assert torch.allclose(new[k], 0.25 * sites[0][k] + 0.75 * sites[1][k])


def test_fedadam_takes_one_adam_step_along_the_lora_aware_mean() -> None:
    current, sites = _adapters()
    strategy = _strategy(strategy="fedadam")
    assert type(innermost(strategy)).__name__ == "AdapterFedAdam"
    new, _ = _round(strategy, current, sites, [10, 30])
    b1, b2, tau, eta = 0.9, 0.99, 1e-3, ADAPTIVE_SERVER_LR
    for k in current:
        delta = (0.25 * sites[0][k] + 0.75 * sites[1][k] - current[k]).double()
        m, v = (1 - b1) * delta, (1 - b2) * delta**2
        eta_norm = eta * math.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's bias correction, round 1
        expected = current[k].double() + eta_norm * m / (v.sqrt() + tau)
        assert torch.allclose(new[k].double(), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_a_server_optimizer_keeps_the_adapters_dtype_so_round_two_is_admitted(name: str
                                                                              ) -> None:
    # Flower's FedOpt computes in float64; the sites train and reply in float32, and the
    # admission check refuses an update whose dtype differs from the global adapter's
    current, sites = _adapters()
    strategy = _strategy(strategy=name)
    rows: list[dict[str, float]] = []
    innermost(strategy).on_train = lambda r, row: rows.append(row)
    after_one, _ = _round(strategy, current, sites, [10, 30])
    assert {v.dtype for v in after_one.values()} == {torch.float32}
    again = [{k: v + 0.01 for k, v in after_one.items()} for _ in range(2)]
    after_two, _ = _round(strategy, after_one, again, [10, 30], server_round=2)
    assert [row["sites-trained"] for row in rows] == [2.0, 2.0]
    assert [row["sites-refused"] for row in rows] == [0.0, 0.0]
    assert {v.dtype for v in after_two.values()} == {torch.float32}


def test_server_optimizers_pair_tensors_by_name_whatever_their_order() -> None:
    # a real adapter's tensors are not in sorted order (layers.10 sorts before layers.2):
    # the aggregate must come back in the order sent, as Flower's optimizers pair by position
    g = torch.Generator().manual_seed(1)
    current = {B: torch.randn(6, 2, generator=g), A: torch.randn(2, 5, generator=g)}
    sites = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in current.items()}
             for _ in range(2)]
    strategy = _strategy(strategy="fedavgm", server_lr=3.0, server_momentum=0.0)
    new, _ = _round(strategy, current, sites, [10, 30])
    assert list(new) == [B, A]
    for k in current:
        mean = 0.25 * sites[0][k] + 0.75 * sites[1][k]
        assert torch.allclose(new[k], current[k] + 3.0 * (mean - current[k]), atol=1e-6)


def test_fedavgm_with_lr_one_and_no_history_is_fedavg() -> None:
    current, sites = _adapters()
    new, _ = _round(_strategy(strategy="fedavgm"), current, sites, [1, 1])
    for k in current:
        assert torch.allclose(new[k], (sites[0][k] + sites[1][k]) / 2, atol=1e-6)


@pytest.mark.parametrize("federation", [
    {"strategy": "fedadam"}, {"strategy": "fedyogi"}, {"strategy": "fedadagrad"},
    {"strategy": "fedavgm", "server_momentum": 0.9}])
def test_a_resumed_server_optimizer_takes_the_uninterrupted_runs_steps(
        federation: dict[str, Any], tmp_path: Path) -> None:
    # three rounds straight through, against: round 1, the aggregator restarts, its state is
    # read back from the run folder, rounds 2 and 3 (Flower numbers them 1 and 2 again)
    g = torch.Generator().manual_seed(3)
    start = {B: torch.randn(6, 2, generator=g), A: torch.randn(2, 5, generator=g)}
    drift = [[{k: 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}
              for _ in range(2)] for _ in range(3)]

    def step(strategy: Strategy, current: dict[str, torch.Tensor], r: int
             ) -> dict[str, torch.Tensor]:
        sites = [{k: current[k] + d[k] for k in current} for d in drift[r]]
        return _round(strategy, current, sites, [10, 30], server_round=r + 1
                      - innermost(strategy).book.round_offset)[0]

    straight = _strategy(**federation)
    assert uses_server_state(straight)
    expected = start
    for r in range(3):
        expected = step(straight, expected, r)

    first = _strategy(**federation)
    after_one = step(first, start, 0)
    store = RunStore(tmp_path)
    store.save_optimizer(1, export_state(first))
    resumed = _strategy(round_offset=1, **federation)
    saved = store.load_optimizer(1)
    assert saved is not None
    restore_state(resumed, saved, list(after_one))
    got = step(resumed, after_one, 1)
    got = step(resumed, got, 2)
    for k in start:
        assert torch.allclose(got[k], expected[k], atol=1e-7), k

    # without the saved state the resumed run would have taken other steps
    forgetful = _strategy(round_offset=1, **federation)
    other = step(forgetful, step(forgetful, after_one, 1), 2)
    assert any(not torch.allclose(other[k], expected[k], atol=1e-7) for k in start)


def test_fedavg_keeps_no_server_optimizer_state(tmp_path: Path) -> None:
    current, sites = _adapters()
    strategy = _strategy()
    _round(strategy, current, sites, [1, 1])
    assert not uses_server_state(strategy)
    assert export_state(strategy) == {}
    RunStore(tmp_path).save_optimizer(1, export_state(strategy))
    assert RunStore(tmp_path).load_optimizer(1) is None


def test_fedprox_sends_mu_to_the_sites() -> None:
    current, sites = _adapters()
    strategy = _strategy(strategy="fedprox", proximal_mu=0.5)
    rows: list[tuple[int, dict[str, float]]] = []
    innermost(strategy).on_train = lambda r, row: rows.append((r, row))
    new, sent = _round(strategy, current, sites, [1, 3])
    assert all(m.content.config_records["config"]["proximal-mu"] == 0.5 for m in sent)
    # the replies went through fed-llama's checks and LoRA-aware aggregation (which records
    # the round), not straight to Flower's FedAvg
    assert [(r, row["sites-trained"]) for r, row in rows] == [(1, 2.0)]
    for k in current:
        assert torch.allclose(new[k], 0.25 * sites[0][k] + 0.75 * sites[1][k], atol=1e-6)


def test_proximal_term_is_half_mu_times_the_squared_distance() -> None:
    layer = torch.nn.Linear(3, 2)
    term = proximal_term(layer, mu=0.4)
    assert term(layer).item() == 0.0
    with torch.no_grad():
        layer.weight += 1.0  # 6 entries moved by 1: ||w - w0||^2 = 6
    value = term(layer)
    assert value.item() == pytest.approx(0.5 * 0.4 * 6)
    value.backward()  # the gradient pulls back towards the global weights: mu (w - w0)
    assert torch.allclose(layer.weight.grad, torch.full((2, 3), 0.4))  # type: ignore[arg-type]


def test_server_optimizers_refuse_exact_aggregation() -> None:
    with pytest.raises(ConfigError, match="re-factorizes A and B every round"):
        build_config(ScenarioConfig, {"federation": {"strategy": "fedyogi",
                                                     "aggregation": "exact"}}, source="test")


def test_cyclic_participation_sends_each_round_to_the_site_whose_turn_it_is() -> None:
    """Round k goes to site (k-1) mod N, wherever its node is, and on --resume the turns
    follow the run's round numbers, not Flower's (which restart at 1)."""
    nodes = {"cardiology": 22, "oncology": 11}  # FakeGrid's nodes are 11 and 22
    current, sites = _adapters()
    for offset, expected in ((0, [22, 11, 22]), (1, [11, 22, 11])):
        strategy = _strategy(offset, nodes, participation="cyclic")
        sent = [list(strategy.configure_train(r, ArrayRecord(current), ConfigRecord(),
                                              FakeGrid(2)))  # type: ignore[arg-type]
                for r in (1, 2, 3)]
        assert [[m.metadata.dst_node_id for m in msgs] for msgs in sent] == [[n] for n in
                                                                            expected]
    # the one reply of a turn is the new global adapter, unchanged
    strategy = _strategy(0, nodes, participation="cyclic")
    msg = next(iter(strategy.configure_train(1, ArrayRecord(current), ConfigRecord(),
                                             FakeGrid(2))))  # type: ignore[arg-type]
    reply = Message(RecordDict({"arrays": ArrayRecord(sites[0]), "metrics": MetricRecord({
        "num-examples": 16, "site": 0, "train-loss": 1.0, "train-seconds": 1.0})}),
        reply_to=msg)
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is not None
    for key, value in arrays.to_torch_state_dict().items():
        assert torch.equal(value, sites[0][key])


def test_cyclic_participation_refuses_what_needs_several_updates_a_round() -> None:
    for extra, fragment in (({"strategy": "fedadam"}, "strategy = 'fedadam'"),
                            ({"robust": "median"}, "robust = 'median'")):
        with pytest.raises(ConfigError, match=fragment):
            build_config(ScenarioConfig, {"federation": {"participation": "cyclic", **extra}},
                         source="test")
    with pytest.raises(ConfigError, match=r"secure_aggregation .* do not apply"):
        build_config(ScenarioConfig, {"federation": {"participation": "cyclic"},
                                      "privacy": {"noise_multiplier": 1.0}}, source="test")
    with pytest.raises(ValueError, match="needs the node of every site"):
        _strategy(participation="cyclic")
