"""The sparsifiers' index helpers and options: reproducible draws, and option bounds."""

from __future__ import annotations

import pytest
import torch

from lightning_gmc.compressors import RandomStreams, TopKApprox, mix_seed, segments_from_numels
from lightning_gmc.compressors.selection import random_subset

CPU = torch.device("cpu")


@pytest.mark.parametrize(("n", "k"), [(40, 30), (40, 10), (10_000, 50)])  # randperm, then sampling
def test_random_subset_is_k_distinct_indices_reproduced_by_the_generator(n: int, k: int) -> None:
    drawn = [random_subset(n, k, torch.Generator().manual_seed(seed), CPU) for seed in (5, 5, 6)]
    for subset in drawn:
        assert subset.numel() == k and subset.unique().numel() == k
        assert 0 <= int(subset.min()) and int(subset.max()) < n
    # Ranks that share a seed must draw the same subset (a shared-seed random-k sums them), and
    # the draw must come from that seed only, not from the global generator.
    torch.manual_seed(0)
    again = random_subset(n, k, torch.Generator().manual_seed(5), CPU)
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], again)
    assert not torch.equal(drawn[0], drawn[2])


def test_random_subset_is_uniform_over_positions() -> None:
    # Each position of range(20) is in a 5-subset with probability 1/4; 4000 draws give counts of
    # 1000 +- 27 (one sigma), for both branches (n = 20 takes randperm, n = 200 samples).
    for n in (20, 200):
        gen = torch.Generator().manual_seed(1)
        counts = torch.zeros(n)
        for _ in range(4000):
            counts[random_subset(n, 5, gen, CPU)] += 1
        expected = 4000 * 5 / n
        sigma = (4000 * (5 / n) * (1 - 5 / n)) ** 0.5
        assert float((counts - expected).abs().max()) < 5 * sigma, n


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, 2.0, float("nan")])
def test_topk_approx_sample_ratio_outside_0_1_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match="sample_ratio"):
        TopKApprox(0.1, sample_ratio=ratio)


@pytest.mark.parametrize("ratio", [0.01, 0.2, 1.0])
def test_topk_approx_selects_exactly_the_top_k_set(ratio: float) -> None:
    # Every coordinate above the sampled threshold is a candidate, so the k largest candidates are
    # the k largest overall; too few candidates fall back to exact top-k. Only the order may differ.
    numels = [20_000, 300, 9]
    x = torch.randn(sum(numels), generator=torch.Generator().manual_seed(4))
    compressor = TopKApprox(0.02, sample_ratio=ratio)
    assert compressor.sample_ratio == ratio
    plan = compressor.plan(segments_from_numels(numels))
    for step in range(3):
        sent = compressor.compress(x, plan, RandomStreams(seed=1, rank=step), step).tensors["indices"]
        offset = 0
        for n in numels:
            k = max(1, int(0.02 * n))
            mine = sent[(offset <= sent) & (sent < offset + n)]
            expected = torch.topk(x[offset : offset + n].abs(), k).indices + offset
            assert set(mine.tolist()) == set(expected.tolist()), (n, step)
            offset += n


def test_topk_approx_falls_back_to_exact_top_k_when_the_sample_overshoots() -> None:
    # Put the largest values exactly on the strided sample: the sampled threshold then admits only a
    # few more than the expected count of the sample (12 here), far fewer than k = 400.
    n, density, seed, step, rank = 20_000, 0.02, 1, 0, 0
    compressor = TopKApprox(density, sample_ratio=0.01)
    stride = n // 200  # 200 samples: max(0.01 n, 2 / density)
    start = mix_seed(seed, step, 0, rank) % stride
    x = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 1e-3
    x[start::stride] += 10.0 + torch.arange(200, dtype=torch.float32)
    plan = compressor.plan(segments_from_numels([n]))
    sent = compressor.compress(x, plan, RandomStreams(seed=seed, rank=rank), step).tensors["indices"]
    assert set(sent.tolist()) == set(torch.topk(x, 400).indices.tolist())
