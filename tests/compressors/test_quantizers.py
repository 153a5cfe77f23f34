"""Bit-budget compressors against their definitions (docs/compressors.md): bit counts and payload
layout, and the round trip against the definitions.

Every check compares the implementation with the definition written out again here (bit
layouts, level sets, independently integrated mu values), never with the implementation itself.
The bit packing is in ``test_quantizers_bitpack.py``; unbiasedness and variance (Monte Carlo) in
``test_quantizers_monte_carlo.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from compressor_roundtrip import decode

from lightning_gmc.compressors import (
    COMPRESSORS,
    Identity,
    NaturalCompression,
    NaturalDithering,
    RandomDithering,
    RandomStreams,
    ScaledCompressor,
    ScaledSign,
    SparseDithering,
    SphericalCompression,
    TernGrad,
    TopK,
    build_compressor,
    scale_for_error_feedback,
    segments_from_numels,
)
from lightning_gmc.compressors.bounds import epsilon_lower_bound, omega_lower_bound
from lightning_gmc.compressors.spherical import spherical_mu

# ------------------------------------------------------------------------------------------------
# Bit counts and payload layout
# ------------------------------------------------------------------------------------------------

NUMELS = [100, 37, 1000]


def _groups(numels: list[int], block: int | None) -> int:
    return len(numels) if block is None else sum(math.ceil(n / block) for n in numels)


def expected_bits(compressor) -> int:
    """The bit formulas of docs/compressors.md (and the documented SD code), written out independently."""
    d = sum(NUMELS)
    if isinstance(compressor, (RandomDithering, NaturalDithering)):
        groups = _groups(NUMELS, compressor.block_size)
        return 32 * groups + d * (1 + math.ceil(math.log2(compressor.levels + 1)))
    if isinstance(compressor, TernGrad):
        return 32 * _groups(NUMELS, compressor.block_size) + 8 * math.ceil(d / 5)
    if isinstance(compressor, ScaledSign):
        return 32 * _groups(NUMELS, compressor.block_size) + d
    if isinstance(compressor, NaturalCompression):
        return 9 * d
    if isinstance(compressor, SparseDithering):
        s = [max(1, math.floor(compressor.density * n + 1e-9)) for n in NUMELS]
        total = sum(s)
        m = min(range(40), key=lambda m: total * (m + 1) + (d - 1) // 2**m)
        signs = sum(min(a, n) for a, n in zip(s, NUMELS, strict=True))
        return 32 * len(NUMELS) + total * (m + 1) + (d - 1) // 2**m + signs
    if isinstance(compressor, SphericalCompression):
        blocks = sum(math.ceil(n / compressor.block_size) for n in NUMELS)
        return 64 + blocks * (compressor.bits_per_block + compressor.norm_bits)
    raise AssertionError(compressor)


ALL = [
    RandomDithering(levels=1),
    RandomDithering(levels=5, block_size=64),
    RandomDithering(levels=3, norm="inf"),
    NaturalDithering(levels=4),
    NaturalDithering(levels=2, block_size=32),
    TernGrad(),
    TernGrad(block_size=50),
    ScaledSign(),
    ScaledSign(block_size=16),
    NaturalCompression(),
    SparseDithering(density=0.01),
    SparseDithering(density=0.3),
    SparseDithering(density=3.0),
    SparseDithering(density=0.2, sampling="multinomial"),
    SphericalCompression(),
    SphericalCompression(block_size=8, bits_per_block=6, norm_bits=32),
]


@pytest.mark.parametrize("compressor", ALL, ids=repr)
def test_bits_and_payload_layout(compressor) -> None:
    x = torch.randn(sum(NUMELS), generator=torch.Generator().manual_seed(1))
    segments = segments_from_numels(NUMELS)
    out, plan, payload = decode(compressor, x, segments, RandomStreams(3, 1), step=5)
    assert torch.isfinite(out).all()
    bits = compressor.payload_bits(plan)
    assert bits == expected_bits(compressor)
    # what is sent is exactly the planned layout, every step
    assert [(s.name, s.dtype, s.numel) for s in plan.payload] == [
        (n, t.dtype, t.numel()) for n, t in payload.tensors.items()
    ]
    assert payload.nbytes == plan.payload_nbytes
    # wire bytes = information bits rounded up to bytes, at most 7 bits of padding per byte-aligned
    # section (documented: one section for the quantizers and SC, two for SD)
    sections = 2 if isinstance(compressor, SparseDithering) else 1
    assert bits <= 8 * plan.payload_nbytes < bits + 8 * sections


def test_registry_names_and_ef_scaling() -> None:
    for name in ["qsgd", "natural", "natural_dithering", "terngrad", "scaled_sign", "sd_l1", "spherical_rc"]:
        assert name in COMPRESSORS
        compressor = build_compressor(name, density=0.05)
        scaled = scale_for_error_feedback(compressor)
        if compressor.unbiased:
            assert isinstance(scaled, ScaledCompressor) and not scaled.unbiased
        else:
            assert scaled is compressor
    assert build_compressor("sd_l1", density=0.05).density == 0.05
    assert scale_for_error_feedback(Identity()).name == "none"
    topk = TopK(0.1)
    assert scale_for_error_feedback(topk) is topk


# ------------------------------------------------------------------------------------------------
# Round trip against the definitions
# ------------------------------------------------------------------------------------------------


def test_qsgd_output_is_a_dithered_level() -> None:
    x = torch.randn(1137, generator=torch.Generator().manual_seed(2)).double()
    for levels, block in [(1, None), (4, None), (7, 100)]:
        c = RandomDithering(levels=levels, block_size=block)
        out, _, _ = decode(c, x.float(), segments_from_numels(NUMELS), RandomStreams(0, 0))
        pos = 0
        for n in NUMELS:
            b = n if block is None else block
            for start in range(0, n, b):
                xs = x[pos + start : pos + min(n, start + b)]
                os = out[pos + start : pos + min(n, start + b)].double()
                h = xs.norm() / levels  # C(x) = ||x|| sign(x) xi / s
                xi = os.abs() / h
                y = xs.abs() / h
                assert torch.allclose(xi, xi.round(), atol=1e-4)
                assert ((xi.round() == y.floor()) | (xi.round() == y.floor() + 1)).all()
                assert (torch.sign(os) * torch.sign(xs) >= 0).all()
            pos += n


def test_natural_dithering_levels() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)).double()
    s = 3
    c = NaturalDithering(levels=s)
    out, _, _ = decode(c, x.float(), segments_from_numels([1000]), RandomStreams(0, 0))
    norm = x.norm()
    grid = [0.0] + [2.0 ** (1 - s + j) for j in range(s)]  # {0, 2^(1-s), ..., 1/2, 1}
    for xi, oi in zip((x.abs() / norm).tolist(), (out.double() / norm).tolist(), strict=True):
        lo = max(g for g in grid if g <= xi)
        hi = min((g for g in grid if g >= xi), default=1.0)
        assert min(abs(abs(oi) - lo), abs(abs(oi) - hi)) < 1e-6


def test_natural_compression_rounds_to_neighbouring_powers_of_two() -> None:
    x = torch.randn(4000, generator=torch.Generator().manual_seed(4)) * 100
    x[:3] = torch.tensor([0.0, 1.0, -0.25])
    out, _, _ = decode(NaturalCompression(), x, segments_from_numels([4000]), RandomStreams(0, 0))
    lx = torch.log2(x.abs().double())
    lo, hi = torch.exp2(torch.floor(lx)), torch.exp2(torch.ceil(lx))
    ok = (out.abs().double() == lo) | (out.abs().double() == hi)
    assert ok[1:].all() and out[0] == 0 and out[1] == 1.0 and out[2] == -0.25
    assert (torch.sign(out) == torch.sign(x)).all()


def test_terngrad_output() -> None:
    x = torch.randn(1137, generator=torch.Generator().manual_seed(5))
    out, _, _ = decode(TernGrad(), x, segments_from_numels(NUMELS), RandomStreams(0, 0))
    pos = 0
    for n in NUMELS:
        m = x[pos : pos + n].abs().max()
        o = out[pos : pos + n]
        assert ((o == 0) | (o.abs() == m)).all()
        assert (o * x[pos : pos + n] >= 0).all()
        pos += n


def test_scaled_sign_is_exact() -> None:
    x = torch.randn(1137, generator=torch.Generator().manual_seed(6))
    x[5] = 0.0
    for block in (None, 64):
        out, _, _ = decode(ScaledSign(block_size=block), x, segments_from_numels(NUMELS), RandomStreams(0, 0))
        expected = torch.empty_like(x)
        pos = 0
        for n in NUMELS:
            b = n if block is None else block
            for start in range(0, n, b):
                xs = x[pos + start : pos + min(n, start + b)]
                sign = torch.where(xs < 0, -1.0, 1.0)  # zeros are sent as +
                expected[pos + start : pos + min(n, start + b)] = xs.abs().sum() / xs.numel() * sign
            pos += n
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("density", [0.005, 0.1, 0.7, 2.5])
@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_sd_l1_definition(density: float, sampling: str) -> None:
    x = torch.randn(1137, generator=torch.Generator().manual_seed(7)).double()
    x[100:137] = 0.0  # a zero parameter still fills its fixed-size slot and decodes to 0
    c = SparseDithering(density=density, sampling=sampling)
    out, _, _ = decode(c, x.float(), segments_from_numels(NUMELS), RandomStreams(0, 2), step=3)
    pos = 0
    for n in NUMELS:
        xs, os = x[pos : pos + n], out[pos : pos + n].double()
        pos += n
        s = max(1, math.floor(density * n + 1e-9))
        if xs.abs().sum() == 0:
            assert (os == 0).all()
            continue
        h = xs.abs().sum() / s  # C(x)_i = (||x||_1 / s) sign(x_i) xi_i
        xi = os.abs() / h
        assert torch.allclose(xi, xi.round(), atol=1e-3)
        xi = xi.round()
        assert xi.sum() == s  # exactly s quanta
        assert (torch.sign(os) * torch.sign(xs) >= 0).all()
        if sampling == "systematic":
            y = xs.abs() / h
            assert ((xi == y.floor()) | (xi == y.floor() + 1)).all()


def test_spherical_matches_codebook_definition() -> None:
    k, bits = 8, 6
    c = SphericalCompression(block_size=k, bits_per_block=bits, norm_bits=32)
    x = torch.randn(1137, generator=torch.Generator().manual_seed(8))
    out, plan, payload = decode(c, x, segments_from_numels(NUMELS), RandomStreams(11, 1), step=4)
    # The codebook from the sent seed: 2^B Gaussian rows normalised to unit length.
    gen = torch.Generator().manual_seed(int(payload.tensors["seed"][0]))
    book = torch.randn(2**bits, k, generator=gen)
    book = book / book.norm(dim=1, keepdim=True)
    mu = 0.7420  # E max_j <u, y_j> for k = 8, B = 6, integrated independently
    pos = 0
    for n in NUMELS:
        for start in range(0, n, k):
            xb = torch.zeros(k)
            xb[: min(k, n - start)] = x[pos + start : pos + min(n, start + k)]
            j = int(torch.argmax(book @ xb))
            expected = xb.norm() * book[j] / mu  # unbiased variant, exact norm
            got = out[pos + start : pos + min(n, start + k)]
            torch.testing.assert_close(got, expected[: min(k, n - start)], rtol=2e-4, atol=1e-6)
        pos += n


def test_spherical_mu_matches_spec_table() -> None:
    # mu values computed independently by numerical integration (not by this library)
    table = {(4, 4): 0.8008, (8, 8): 0.8312, (16, 8): 0.6464, (16, 16): 0.8454, (32, 12): 0.5904}
    for (k, bits), mu in table.items():
        assert abs(spherical_mu(k, 2**bits) - mu) < 1e-4
    assert abs(SphericalCompression(block_size=64, bits_per_block=6).mu - 0.2894) < 1e-4


def test_results_do_not_depend_on_bucket_layout() -> None:
    x = torch.randn(1137, generator=torch.Generator().manual_seed(9))
    rng = RandomStreams(5, 1)
    compressors = [RandomDithering(2), SparseDithering(0.2), SphericalCompression(), NaturalCompression()]
    for c in [*compressors, SparseDithering(0.3, sampling="multinomial"), TernGrad()]:
        whole, _, _ = decode(c, x, segments_from_numels(NUMELS, [0, 1, 2]), rng, step=2)
        alone, _, _ = decode(c, x[137:].clone(), segments_from_numels([1000], [2]), rng, step=2)
        torch.testing.assert_close(whole[137:], alone)


def test_bounds() -> None:
    assert epsilon_lower_bound(1.0) == 0.25
    assert abs(omega_lower_bound(1.0) - 1 / 3) < 1e-12
    assert abs(omega_lower_bound(2.0) - 1 / 15) < 1e-12
