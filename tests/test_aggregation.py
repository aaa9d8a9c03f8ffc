"""Aggregation of LoRA updates against hand computation."""

from __future__ import annotations

import pytest
import torch

from fed_llama.server.aggregation import (
    clip_norms,
    coordinate_median,
    flat_norm,
    mean_of_b,
    mean_of_factors,
    mean_of_products,
    trimmed_mean,
    weighted_mean,
)

A = "layers.0.q_proj.lora_A.weight"
B = "layers.0.q_proj.lora_B.weight"


def adapter(rank: int, seed: int, out: int = 6, inp: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, inp, generator=g), B: torch.randn(out, rank, generator=g)}


def test_weighted_mean_by_hand() -> None:
    s1 = {"x": torch.tensor([1.0, 2.0])}
    s2 = {"x": torch.tensor([4.0, 8.0])}
    # weights 10 and 30 examples: (10*[1,2] + 30*[4,8]) / 40 = [3.25, 6.5]
    assert torch.allclose(weighted_mean([s1, s2], [10, 30])["x"], torch.tensor([3.25, 6.5]))


def test_mean_of_factors_is_per_tensor_fedavg() -> None:
    s1, s2 = adapter(2, 0), adapter(2, 1)
    got = mean_of_factors([s1, s2], [1, 3])
    assert torch.allclose(got[A], 0.25 * s1[A] + 0.75 * s2[A])
    assert torch.allclose(got[B], 0.25 * s1[B] + 0.75 * s2[B])


def test_exact_mode_reproduces_the_weighted_mean_of_products() -> None:
    sites = [adapter(2, i) for i in range(3)]
    weights, scale = [5, 3, 2], 16 / 2
    # the mean of three rank-2 products has rank <= 6: a global rank of 6 is lossless
    result = mean_of_products(sites, weights, scales=[scale] * 3, rank=6, global_scale=scale)
    expected = torch.stack([w / 10 * scale * s[B] @ s[A]
                            for w, s in zip(weights, sites, strict=True)]).sum(0)
    got = scale * result.state[B] @ result.state[A]
    assert torch.allclose(got, expected, atol=1e-5)
    assert result.relative_residual < 1e-5
    # and naive factor averaging is NOT the mean of the products
    naive = mean_of_factors(sites, weights)
    assert not torch.allclose(scale * naive[B] @ naive[A], expected, atol=1e-2)


def test_exact_mode_truncates_to_the_global_rank_optimally() -> None:
    sites = [adapter(2, i) for i in range(3)]
    result = mean_of_products(sites, [1, 1, 1], scales=[1.0] * 3, rank=2, global_scale=1.0)
    assert result.state[A].shape == (2, 5) and result.state[B].shape == (6, 2)
    mean = sum(s[B] @ s[A] for s in sites) / 3
    sv = torch.linalg.svdvals(mean)
    # Eckart-Young: the best rank-2 error is the norm of the dropped singular values
    best = float(torch.sqrt((sv[2:] ** 2).sum()) / torch.linalg.norm(mean))
    assert result.relative_residual == pytest.approx(best, rel=1e-4)


def test_heterogeneous_ranks_aggregate_to_the_global_rank() -> None:
    small, large = adapter(2, 0), adapter(8, 1)
    alpha = 16
    result = mean_of_products([small, large], [1, 1], scales=[alpha / 2, alpha / 8], rank=4,
                              global_scale=alpha / 4)
    assert result.state[A].shape == (4, 5) and result.state[B].shape == (6, 4)


def test_ffa_keeps_a_and_averages_b() -> None:
    frozen = {A: adapter(2, 42)[A]}
    s1 = {A: frozen[A].clone(), B: torch.ones(6, 2)}
    s2 = {A: frozen[A].clone(), B: 3 * torch.ones(6, 2)}
    got = mean_of_b([s1, s2], [1, 1], frozen)
    assert torch.equal(got[A], frozen[A])
    assert torch.allclose(got[B], 2 * torch.ones(6, 2))
    # with A shared, the mean of B gives exactly the mean of the products
    assert torch.allclose(got[B] @ got[A], (s1[B] @ s1[A] + s2[B] @ s2[A]) / 2)
    s2[A] = s2[A] + 1
    with pytest.raises(ValueError, match="update 1 changed the frozen"):
        mean_of_b([s1, s2], [1, 1], frozen)


def test_norm_clipping_bounds_each_update() -> None:
    small = {"x": torch.tensor([0.3, 0.4])}        # norm 0.5, kept as it is
    large = {"x": torch.tensor([30.0, 40.0])}      # norm 50, scaled to 1
    clipped = clip_norms([small, large], max_norm=1.0)
    assert torch.allclose(clipped[0]["x"], small["x"])
    assert flat_norm(clipped[1]) == pytest.approx(1.0)
    assert torch.allclose(clipped[1]["x"], torch.tensor([0.6, 0.8]))


def test_median_and_trimmed_mean_ignore_one_poisoned_site() -> None:
    honest = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([1.2, 2.2])},
              {"x": torch.tensor([0.8, 1.8])}, {"x": torch.tensor([1.1, 2.1])}]
    poisoned = [*honest, {"x": torch.tensor([100.0, -100.0])}]
    assert torch.allclose(coordinate_median(poisoned)["x"], torch.tensor([1.1, 2.0]))
    # even count: mean of the two middle values
    assert torch.allclose(coordinate_median(honest)["x"], torch.tensor([1.05, 2.05]))
    # trim 20% of 5 = 1 from each end: mean of the middle three,
    # (1.0 + 1.1 + 1.2) / 3 and (1.8 + 2.0 + 2.1) / 3
    assert torch.allclose(trimmed_mean(poisoned, 0.2)["x"], torch.tensor([1.1, 5.9 / 3]))
    with pytest.raises(ValueError, match="trim must be"):
        trimmed_mean(poisoned, 0.5)


def test_mismatched_updates_are_refused() -> None:
    with pytest.raises(ValueError, match="other tensors"):
        weighted_mean([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="one weight per update"):
        weighted_mean([{"x": torch.zeros(1)}], [1, 2])
    with pytest.raises(ValueError, match="not all zero"):
        weighted_mean([{"x": torch.zeros(1)}], [0])


def test_combine_clips_then_averages() -> None:
    from fed_llama.server.aggregation import combine

    current = {"x.lora_A.weight": torch.zeros(2), "x.lora_B.weight": torch.zeros(2)}
    honest = {"x.lora_A.weight": torch.tensor([0.3, 0.0]), "x.lora_B.weight": torch.zeros(2)}
    huge = {"x.lora_A.weight": torch.tensor([0.0, 300.0]), "x.lora_B.weight": torch.zeros(2)}
    state, info = combine(current, [honest, huge], [1, 1], aggregation="factors", clip_norm=1.0,
                          rank=1, alpha=1.0)
    assert info["max-update-norm"] == pytest.approx(300.0)
    # the huge update is scaled to norm 1 before the mean: ([0.3, 0] + [0, 1]) / 2
    assert torch.allclose(state["x.lora_A.weight"], torch.tensor([0.15, 0.5]))


def test_changing_rank_keeps_the_product_up_to_truncation() -> None:
    from fed_llama.adapter.rank import change_rank

    state = adapter(8, 3)
    # a product of rank 2 (B has 2 non-zero columns) survives a move to rank 4 exactly
    state[B][:, 2:] = 0
    low = change_rank(state, scale=2.0, rank=4, new_scale=4.0)
    assert low[A].shape == (4, 5) and low[B].shape == (6, 4)
    assert torch.allclose(4.0 * low[B] @ low[A], 2.0 * state[B] @ state[A], atol=1e-5)


def test_directions_the_product_lacks_keep_a_trainable_a() -> None:
    from fed_llama.adapter.rank import change_rank

    zero_b = {A: torch.randn(8, 5), B: torch.zeros(6, 8)}  # round 1: B = 0, product 0
    fill = adapter(4, 9)
    low = change_rank(zero_b, scale=2.0, rank=4, new_scale=4.0, fill=fill)
    assert torch.equal(low[B], torch.zeros(6, 4))      # the product is still 0 ...
    assert torch.equal(low[A], fill[A])                 # ... but A is the site's own init


def test_updates_of_different_ranks_average_their_products() -> None:
    from fed_llama.server.aggregation import combine

    small, large = adapter(2, 0), adapter(8, 1)
    current = adapter(4, 2)
    new, info = combine(current, [small, large], [1.0, 3.0], aggregation="exact", rank=4,
                        alpha=16.0, site_ranks=[2, 8])
    mean = 0.25 * 8.0 * small[B] @ small[A] + 0.75 * 2.0 * large[B] @ large[A]
    sv = torch.linalg.svdvals(mean)
    best = float(torch.sqrt((sv[4:] ** 2).sum()) / torch.linalg.norm(mean))
    assert info["svd-relative-residual"] == pytest.approx(best, rel=1e-4)
    assert new[A].shape == (4, 5)
