"""Built-in compressors against their definitions (docs/algorithms.md 3.6-3.8, the paper's section 5)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import TopK, segments

from lightning_gmc.compressors import (
    COMPRESSORS,
    RandomStreams,
    build_compressor,
    segments_from_numels,
    selected_count,
)

NUMELS = [7, 130, 1, 64]


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(sum(NUMELS), generator=torch.Generator().manual_seed(seed))


def _round_trip(name: str, density: float, x: torch.Tensor, rank: int = 0, step: int = 3, **options):
    compressor = build_compressor(name, density=density, **options)
    plan = compressor.plan(segments_from_numels(NUMELS))
    payload = compressor.compress(x, plan, RandomStreams(seed=5, rank=rank), step)
    decoded = torch.zeros_like(x)
    compressor.decompress_add(payload, plan, decoded)
    return compressor, plan, payload, decoded


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_topk_keeps_the_k_largest_per_parameter(density: float) -> None:
    x = _x()
    compressor, plan, payload, decoded = _round_trip("topk", density, x)
    expected = TopK(density)(x, step=3, layout=segments(NUMELS))  # the selection written out by hand
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)
    total = sum(max(1, math.floor(density * n + 1e-9)) for n in NUMELS)
    # fp32 value + int32 index per coordinate: 8 bytes, 64 information bits.
    assert payload.nbytes == plan.payload_nbytes == 8 * total
    assert compressor.payload_bits(plan) == 64 * total
    residual = x.clone()
    compressor.subtract_own(residual, payload, plan, torch.empty_like(x))
    assert torch.equal(residual + decoded, x)  # x - C(x) exactly


def test_topk_approx_sends_exactly_k_and_approximates_topk() -> None:
    numels = [50_000, 3_000, 10]
    x = torch.randn(sum(numels), generator=torch.Generator().manual_seed(1))
    segments = segments_from_numels(numels)
    approx = build_compressor("topk_approx", density=0.01)
    exact = build_compressor("topk", density=0.01)
    plan_a, plan_e = approx.plan(segments), exact.plan(segments)
    rng = RandomStreams(0, 0)
    pa = approx.compress(x, plan_a, rng, 0)
    pe = exact.compress(x, plan_e, rng, 0)
    assert pa.tensors["indices"].numel() == plan_a.total == pe.tensors["indices"].numel()
    assert pa.tensors["indices"].unique().numel() == plan_a.total
    overlap = len(set(pa.tensors["indices"].tolist()) & set(pe.tensors["indices"].tolist())) / plan_a.total
    assert overlap > 0.8, overlap  # candidates above the sampled threshold, then the k largest of them
    torch.testing.assert_close(pa.tensors["values"], x[pa.tensors["indices"].long()])


@pytest.mark.parametrize("name", ["rbgs", "randk"])
def test_shared_support_is_identical_on_every_rank_and_sends_no_indices(name: str) -> None:
    x0, x1 = _x(0), _x(1)
    c, plan, p0, _ = _round_trip(name, 0.1, x0, rank=0)
    _, _, p1, _ = _round_trip(name, 0.1, x1, rank=1)
    assert c.shared_support
    assert torch.equal(p0.context["index"], p1.context["index"])
    assert set(p0.tensors) == {"values"}
    total = sum(max(1, math.floor(0.1 * n + 1e-9)) for n in NUMELS)
    assert p0.nbytes == 4 * total and c.payload_bits(plan) == 32 * total
    # a different step draws a different support
    _, _, p_other, _ = _round_trip(name, 0.1, x0, rank=0, step=4)
    assert not torch.equal(p0.context["index"], p_other.context["index"])


def test_rbgs_blocks_are_contiguous_with_wrap_around() -> None:
    x = _x()
    compressor, plan, payload, _ = _round_trip("rbgs", 0.3, x)
    index = payload.context["index"]
    offset = cursor = 0
    for n in NUMELS:
        k = max(1, math.floor(0.3 * n + 1e-9))
        block = (index[cursor : cursor + k] - offset).tolist()
        start = block[0]
        assert block == [(start + j) % n for j in range(k)]
        offset += n
        cursor += k


@pytest.mark.parametrize(("name", "n", "k"), [("rbgs", 40, 10), ("randk", 40, 10), ("randk", 400, 8)])
def test_shared_random_supports_cover_every_coordinate_with_probability_density(
    name: str, n: int, k: int
) -> None:
    # Each coordinate is selected with probability k/n (delta = density in expectation);
    # randk's sparse path (k << n) draws distinct indices without a permutation of n.
    trials = 4000
    compressor = build_compressor(name, density=k / n)
    plan = compressor.plan(segments_from_numels([n]))
    hits = torch.zeros(n)
    rng = RandomStreams(11, 0)
    for step in range(trials):
        chosen = compressor.select(torch.zeros(n), plan, rng, step)
        assert chosen.unique().numel() == k
        hits[chosen] += 1
    p = k / n
    # 5 sigma of a binomial(trials, p) per coordinate
    tolerance = 5 * math.sqrt(trials * p * (1 - p))
    assert (hits - trials * p).abs().max() < tolerance


def test_identity_round_trip_and_accounting() -> None:
    x = _x()
    compressor, plan, payload, decoded = _round_trip("none", 0.5, x)
    assert torch.equal(decoded, x)
    assert payload.nbytes == 4 * x.numel() and compressor.broadcast_bits([payload], plan) == 32 * x.numel()


def test_selected_count_floor_with_minimum_one() -> None:
    assert selected_count(0.29, 100) == 29
    assert selected_count(0.001, 10) == 1
    assert selected_count(1.0, 17) == 17


def test_unknown_compressor_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names: .*rbgs.*topk"):
        build_compressor("bogus")
    with pytest.raises(ValueError, match="does not take option"):
        build_compressor("topk", sample_ratio=0.1)
    for density in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density"):
            build_compressor("topk", density=density)
    assert {"none", "topk", "topk_approx", "randk", "rbgs"} <= set(COMPRESSORS)


@pytest.mark.parametrize("name", ["none", "rbgs", "randk"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_decode_of_an_all_reduced_sum_matches_the_generic_definition(name: str, world_size: int) -> None:
    # The overrides skip passes over `out`; they must give exactly the bits of zero_ + decompress_add +
    # div_, signed zeros and infinities included.
    x = _x(2)
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45])
    compressor, plan, payload, _ = _round_trip(name, 0.5, x)
    for tensor in payload.tensors.values():
        tensor[:6] = x[:6]
    reference = torch.zeros_like(x)
    compressor.decompress_add(payload, plan, reference)
    reference.div_(world_size)
    fast = torch.full_like(x, 7.0)  # stale contents must not survive
    compressor.decode_summed(payload, plan, fast, world_size)
    assert torch.equal(fast.view(torch.int32), reference.view(torch.int32))
