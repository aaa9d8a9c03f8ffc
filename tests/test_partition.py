"""Dirichlet(alpha) partitioning of pooled categories into simulated sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import dirichlet_scenario

from fed_llama.data.partition import dirichlet_partition, dirichlet_proportions
from fed_llama.errors import ConfigError


def test_every_example_goes_to_exactly_one_site() -> None:
    labels = [i % 5 for i in range(1000)]
    train, held = dirichlet_partition(labels, labels[:200], parts=4, alpha=0.5, seed=0)
    assert sorted(i for part in train for i in part) == list(range(1000))
    assert sorted(i for part in held for i in part) == list(range(200))
    # the same draw again: a partition is reproducible from its seed
    assert dirichlet_partition(labels, labels[:200], parts=4, alpha=0.5, seed=0) == (train, held)


def _largest_share(alpha: float) -> float:
    """Mean over categories of the largest share one site gets."""
    return float(dirichlet_proportions(200, 5, alpha, seed=1).max(axis=1).mean())


def test_small_alpha_skews_and_large_alpha_evens_out() -> None:
    props = dirichlet_proportions(3, 4, 0.5, seed=0)
    assert np.allclose(props.sum(axis=1), 1.0)
    assert _largest_share(0.1) > 0.8       # nearly every category lives at one site
    assert _largest_share(100.0) < 0.3     # close to the even 1/5


def test_sites_share_a_categorys_train_and_heldout_alike() -> None:
    labels = [0] * 500 + [1] * 500
    train, held = dirichlet_partition(labels, labels, parts=2, alpha=0.3, seed=3)
    for t, h in zip(train, held, strict=True):
        share_t = sum(labels[i] == 0 for i in t) / max(len(t), 1)
        share_h = sum(labels[i] == 0 for i in h) / max(len(h), 1)
        assert share_t == pytest.approx(share_h, abs=0.1)


def test_an_impossible_partition_is_refused() -> None:
    with pytest.raises(ConfigError, match="raise dirichlet_alpha or lower num_partitions"):
        dirichlet_partition([0, 1], [0, 1], parts=5, alpha=0.5, seed=0)


def test_a_dirichlet_scenario_deals_pooled_sources_to_its_sites(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl) -> None:
    from fed_llama.client.site import site_data

    scenario = dirichlet_scenario(tiny_backbone, write_jsonl)
    assert scenario.site_names() == ["part-00", "part-01", "part-02"]
    data = [site_data(scenario, i) for i in range(3)]
    # 30 + 20 records, 10% of each held out: every record lands at exactly one site
    assert sum(len(d.train) + len(d.heldout) for d in data) == 50
    assert all(d.summary["categories"] for d in data)
