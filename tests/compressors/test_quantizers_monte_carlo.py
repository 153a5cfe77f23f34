"""Bit-budget compressors against their definitions (docs/compressors.md), by Monte Carlo:
unbiasedness, and variance / contraction against the formulas.

Every check compares the implementation with the definition written out again here (variance
formulas, independently integrated mu values), never with the implementation itself.
Monte Carlo tolerances are derived from the sample count: a statistic passes when it lies within
``z * sd / sqrt(T)`` of its target, with ``z`` the two-sided normal quantile at ``ALPHA`` after a
Bonferroni correction for the number of simultaneous checks. Seeds are fixed, so the tests are
deterministic; ``ALPHA`` only sets how strict the derived bound is.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from compressor_roundtrip import decode

from lightning_gmc.compressors import (
    NaturalCompression,
    NaturalDithering,
    RandomDithering,
    RandomStreams,
    ScaledCompressor,
    SparseDithering,
    SphericalCompression,
    TernGrad,
    segments_from_numels,
)

ALPHA = 1e-3


def z_bound(tests: int = 1) -> float:
    """Two-sided normal quantile for ``tests`` simultaneous checks at family-wise level ``ALPHA``."""
    return NormalDist().inv_cdf(1.0 - ALPHA / (2.0 * tests))


def replicated(x: torch.Tensor, copies: int):
    """``copies`` back-to-back copies of ``x`` as separate parameters: one call gives ``copies``
    independent draws, because private randomness is keyed by the parameter index."""
    return x.repeat(copies), segments_from_numels([x.numel()] * copies)


# ------------------------------------------------------------------------------------------------
# Monte Carlo: unbiasedness and variance / contraction against the formulas
# ------------------------------------------------------------------------------------------------

D = 48
T = 2000


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10)
    gauss = torch.randn(D, generator=gen)
    flat = torch.where(torch.rand(D, generator=gen) < 0.5, -1.0, 1.0)
    natural_worst = flat * (4.0 / 3.0) * 2.0 ** torch.randint(-3, 3, (D,), generator=gen)
    return {"gauss": gauss, "flat": flat, "natural_worst": natural_worst}


def exact_variance(name: str, c, x: torch.Tensor) -> float:
    """``E||C(x) - x||^2`` from the formulas (float64, one parameter)."""
    x = x.double()
    a = x.abs()
    if name == "qsgd":  # h^2 sum f(1-f), h = ||x|| / s
        h = x.norm() / c.levels
        f = a / h - torch.floor(a / h)
        return float(h**2 * (f * (1 - f)).sum())
    if name == "sd_l1":  # h^2 sum f(1-f), h = ||x||_1 / s
        s = max(1, math.floor(c.density * D + 1e-9))
        h = a.sum() / s
        f = a / h - torch.floor(a / h)
        return float(h**2 * (f * (1 - f)).sum())
    if name == "sd_l1_multinomial":  # (||x||_1^2 - ||x||^2) / s
        s = max(1, math.floor(c.density * D + 1e-9))
        return float((a.sum() ** 2 - (a**2).sum()) / s)
    if name == "terngrad":  # sum |x_i| (M - |x_i|)
        return float((a * (a.max() - a)).sum())
    if name == "natural":  # sum (hi - |x|)(|x| - lo)
        lo, hi = torch.exp2(torch.floor(torch.log2(a))), torch.exp2(torch.ceil(torch.log2(a)))
        return float(((hi - a) * (a - lo)).sum())
    if name == "natural_dithering":
        norm = x.norm()
        y = a / norm
        e = torch.floor(torch.log2(y))
        lo = torch.where(e >= 1 - c.levels, torch.exp2(e), torch.zeros_like(y))
        hi = torch.where(e >= 1 - c.levels, torch.exp2(e + 1), torch.full_like(y, 2.0 ** (1 - c.levels)))
        return float(((hi - y) * (y - lo)).sum() * norm**2)
    raise AssertionError(name)


ELEMENTWISE = [
    ("qsgd", RandomDithering(levels=2)),
    ("sd_l1", SparseDithering(density=0.25)),
    ("sd_l1", SparseDithering(density=1.5)),
    ("sd_l1_multinomial", SparseDithering(density=0.5, sampling="multinomial")),
    ("terngrad", TernGrad()),
    ("natural", NaturalCompression()),
    ("natural_dithering", NaturalDithering(levels=3)),
]


@pytest.mark.parametrize(("name", "compressor"), ELEMENTWISE, ids=lambda v: v if isinstance(v, str) else "")
def test_unbiased_and_variance_monte_carlo(name: str, compressor) -> None:
    inputs = _inputs()
    for label, x in inputs.items():
        xs, segments = replicated(x, T)
        out, _, _ = decode(compressor, xs, segments, RandomStreams(20, 3), step=1)
        samples = out.view(T, D).double()
        # Unbiasedness: every coordinate's mean within z * sd / sqrt(T), Bonferroni over D.
        mean, sd = samples.mean(0), samples.std(0)
        z = z_bound(D * len(inputs))
        deterministic = sd == 0
        assert torch.equal(mean[deterministic], x.double()[deterministic])
        assert ((mean - x.double()).abs() <= z * sd / math.sqrt(T) + 1e-9)[~deterministic].all(), label
        # Variance: the mean squared error matches the exact formula within its own standard error,
        # and the normalized error never exceeds omega (the worst-case parameter).
        err = ((samples - x.double()) ** 2).sum(1)
        target = exact_variance(name, compressor, x)
        tol = z_bound(2 * len(inputs)) * float(err.std()) / math.sqrt(T)
        # (+ fp32 rounding: with systematic rounding on a flat x the error is deterministic)
        assert abs(float(err.mean()) - target) <= tol + 1e-6 * target, (label, float(err.mean()), target)
        assert target <= compressor.omega(D) * float((x.double() ** 2).sum()) * (1 + 1e-9), label


def test_sd_l1_flat_vector_attains_d_over_s_minus_one() -> None:
    c = SparseDithering(density=0.25)
    assert abs(exact_variance("sd_l1", c, _inputs()["flat"]) / D - (D / 12 - 1)) < 1e-9
    assert abs(c.omega_flat(D) - (D / 12 - 1)) < 1e-12
    assert c.omega(D) == min(D / 12, D * D / (4 * 144))


def test_terngrad_worst_case_supremum() -> None:
    # x = (1, a, ..., a) with a = 1/(sqrt(d)+1) attains omega = (sqrt(d) - 1)/2
    a = 1 / (math.sqrt(D) + 1)
    x = torch.full((D,), a, dtype=torch.float64)
    x[0] = 1.0
    assert abs(exact_variance("terngrad", TernGrad(), x) / float((x**2).sum()) - TernGrad().omega(D)) < 1e-9


@pytest.mark.parametrize(
    ("kwargs", "mu"),
    [
        ({"block_size": 8, "bits_per_block": 6, "norm_bits": 32}, 0.7420),
        ({"block_size": 4, "bits_per_block": 4}, 0.8008),
    ],
)
def test_spherical_unbiased_and_omega_monte_carlo(kwargs: dict, mu: float) -> None:
    c = SphericalCompression(**kwargs)
    k = c.block_size
    x = torch.randn(3 * k, generator=torch.Generator().manual_seed(12))
    segments = segments_from_numels([x.numel()])
    plan = c.plan(segments)
    rng = RandomStreams(21, 0)
    trials = 1500
    samples = torch.empty(trials, x.numel(), dtype=torch.float64)
    for t in range(trials):  # the codebook is per step, so independent draws need distinct steps
        out = torch.zeros_like(x)
        c.decompress_add(c.compress(x, plan, rng, t), plan, out)
        samples[t] = out.double()
    xd = x.double()
    mean, sd = samples.mean(0), samples.std(0)
    assert ((mean - xd).abs() <= z_bound(x.numel()) * sd / math.sqrt(trials)).all()
    err = ((samples - xd) ** 2).sum(1) / float((xd**2).sum())
    omega = 1 / mu**2 - 1  # docs/compressors.md (SC-RC), exact norm
    if c.norm_bits == 32:
        # rotation invariance makes omega exact for every x
        tol = z_bound(2) * float(err.std()) / math.sqrt(trials)
        assert abs(float(err.mean()) - omega) <= tol
        assert abs(c.omega(x.numel()) - omega) < 1e-3
    else:
        # 8-bit natural-compression norms: omega composes to (1 + omega)(1 + 1/8) - 1 (worst case)
        bound = (1 + omega) * 1.125 - 1
        tol = z_bound(1) * float(err.std()) / math.sqrt(trials)
        assert float(err.mean()) <= bound + tol
        assert abs(c.omega(x.numel()) - bound) < 1e-3


@pytest.mark.parametrize("inner", [RandomDithering(1), SparseDithering(density=0.1), TernGrad()], ids=repr)
def test_ef_scaling_is_contractive(inner) -> None:
    scaled = ScaledCompressor(inner)
    x = _inputs()["flat"]
    xs, segments = replicated(x, 2000)
    out, _, _ = decode(scaled, xs, segments, RandomStreams(22, 0))
    raw, _, _ = decode(inner, xs, segments, RandomStreams(22, 0))
    omega = inner.omega(D)
    torch.testing.assert_close(out, raw / (1 + omega))  # C / (1 + omega), same bits
    err = ((out.view(2000, D).double() - x.double()) ** 2).sum(1) / float((x.double() ** 2).sum())
    tol = z_bound(1) * float(err.std()) / math.sqrt(2000)
    assert float(err.mean()) <= omega / (1 + omega) + tol  # delta = 1/(1+omega) (docs/compressors.md)
    assert scaled.delta(D) == pytest.approx(1 / (1 + omega))
