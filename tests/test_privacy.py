"""Client-level differential privacy: clipped equal-weight mean plus calibrated noise."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.errors import ConfigError
from fed_llama.server.aggregation import combine
from fed_llama.server.privacy import add_noise, epsilon
from fed_llama.server.strategy import build_strategy

A = "m.layers.0.q_proj.lora_A.weight"
B = "m.layers.0.q_proj.lora_B.weight"


def test_the_mean_is_of_clipped_changes_with_equal_weights() -> None:
    current = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    big = {A: torch.tensor([[3.0, 4.0]]), B: torch.zeros(2, 1)}     # change norm 5 -> 1
    small = {A: torch.tensor([[0.3, 0.4]]), B: torch.zeros(2, 1)}   # norm 0.5, kept
    mean, _ = combine(current, [big, small], [1.0, 1.0], aggregation="factors", clip_norm=1.0,
                      rank=1, alpha=1.0)
    assert torch.allclose(mean[A], torch.tensor([[(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]]))
    g = torch.Generator().manual_seed(7)
    noisy = add_noise(mean, current, sites=2, clip_norm=1.0, noise_multiplier=0.5, generator=g)
    g = torch.Generator().manual_seed(7)
    expected = mean[A].double() + torch.randn((1, 2), generator=g, dtype=torch.float64) * 0.25
    assert torch.allclose(noisy[A].double(), expected)


def test_the_noise_has_standard_deviation_sigma_c_over_n() -> None:
    current = {B: torch.zeros(400, 250)}
    noisy = add_noise(current, current, sites=4, clip_norm=0.2, noise_multiplier=1.5)
    assert float(noisy[B].std()) == pytest.approx(1.5 * 0.2 / 4, rel=0.02)
    assert abs(float(noisy[B].mean())) < 1e-3


def test_ffa_frozen_a_gets_no_noise() -> None:
    current = {A: torch.randn(2, 3), B: torch.zeros(3, 2)}
    noisy = add_noise(current, current, sites=2, clip_norm=1.0, noise_multiplier=1.0,
                      trainable={B})
    assert torch.equal(noisy[A], current[A]) and not torch.equal(noisy[B], current[B])


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    assert epsilon(0, 1.0, 1e-5) == 0.0
    assert epsilon(5, 1.0, 1e-5) < epsilon(10, 1.0, 1e-5)
    assert epsilon(10, 2.0, 1e-5) < epsilon(10, 1.0, 1e-5)
    # never worse than the textbook RDP bound of T Gaussian mechanisms:
    # eps <= min over alpha of T*alpha/(2 sigma^2) + log(1/delta)/(alpha - 1)
    t, sigma, delta = 10, 1.0, 1e-5
    bound = min(t * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
                for a in [1 + x / 10 for x in range(1, 1000)])
    assert epsilon(t, sigma, delta) <= bound + 1e-9


def test_conflicting_dp_settings_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        build_config(ScenarioConfig, {"privacy": {"noise_multiplier": 1.0, "clip_norm": 0.0},
                                      "federation": {"aggregation": "exact"}}, source="test")
    assert "re-factorizes" in str(err.value) and "clip_norm must be positive" in str(err.value)
    with pytest.raises(ConfigError, match=r"set only privacy\.clip_norm"):
        build_config(ScenarioConfig, {"privacy": {"noise_multiplier": 1.0},
                                      "federation": {"clip_norm": 1.0}}, source="test")


@pytest.mark.usefixtures("flower_task")
def test_a_dp_round_reports_epsilon() -> None:
    scenario = build_config(ScenarioConfig, {
        "federation": {"sites": ["icd10:cardiology", "icd10:oncology"]},
        "privacy": {"noise_multiplier": 1.0, "clip_norm": 0.5}}, source="test")
    rows: dict[int, dict[str, float]] = {}
    strategy = build_strategy(scenario, scenario.site_names(), round_offset=2,
                              on_train=lambda r, row: rows.__setitem__(r, row),
                              on_evaluate=lambda *_: None)
    current = {A: torch.zeros(2, 4), B: torch.zeros(4, 2)}
    sent = list(strategy.configure_train(1, ArrayRecord(current), ConfigRecord(),
                                         FakeGrid(2)))  # type: ignore[arg-type]
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: v + 1.0 for k, v in
                                                          current.items()}),
                                   "metrics": MetricRecord({"num-examples": 5, "site": i,
                                                            "train-loss": 1.0})}), reply_to=m)
               for i, m in enumerate(sent)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    row = rows[3]  # the third round of the run: epsilon accounts for three rounds
    assert row["dp-epsilon"] == pytest.approx(epsilon(3, 1.0, 1e-5))
    new = arrays.to_torch_state_dict()
    change = torch.cat([new[k].flatten() - current[k].flatten() for k in current])
    # each change (norm 4) was clipped to 0.5: the mean moves 0.5/4 per entry, plus noise
    # of std 1.0 * 0.5 / 2 = 0.25 around it
    assert float(change.mean()) == pytest.approx(0.125, abs=0.25)
