"""Quantizing compressors with exact bit accounting (spec ``compressors.md`` §6) and the
error-feedback scaling wrapper (§2.3).

=====================  ===================================  =====================================
name                   what it sends per norm group of d     parameter (worst case over x)
=====================  ===================================  =====================================
``qsgd``               ``||x||_p`` (fp32) + d codes of        ``U(omega)``,
                       ``1 + ceil(log2(s+1))`` bits           ``omega = min(d^{2/r}/(4s^2), d^{1/r}/s)``,
                       (sign + level)                         ``r = min(p, 2)``
``natural_dithering``  same layout, power-of-two levels       ``U(omega)``, ``omega = 1/8 +
                       ``{0, 2^{1-s}, ..., 1/2, 1}``          d^{1/r} 2^{1-s} min(1, d^{1/r} 2^{1-s})``
``natural``            9 bits per coordinate (sign +          ``U(1/8)``
                       8-bit exponent), no norm
``terngrad``           ``||x||_inf`` (fp32) + d trits,        ``U((sqrt(d) - 1) / 2)``
                       five per byte (1.6 bits/coord)
``scaled_sign``        ``||x||_1 / d`` (fp32) + d sign bits   ``B(delta)``, ``delta = 1/d``
                                                              (Gaussian x: about ``2/pi``)
=====================  ===================================  =====================================

A *norm group* is a whole parameter (segment) by default, or a block of ``block_size`` consecutive
coordinates inside a parameter when ``block_size`` is set (QSGD's "bucketing"): each block then sends
its own fp32 scale and ``d`` in the formulas above becomes the block size. Groups never cross a
parameter boundary, so the result does not depend on how DDP groups parameters into buckets; private
randomness is drawn per parameter for the same reason.

Wire format of one payload (the whole bucket): ``scales`` (fp32, one per norm group) followed by one
``uint8`` tensor of packed codes (:mod:`lightning_gmc.compressors.bitpack`). ``payload_bits`` is the
information content: ``32 * groups + numel * bits_per_code`` (ternary: ``8 * ceil(numel / 5)``); the
wire adds at most 7 bits of byte padding per payload. Decoding reads only the wire tensors, so the
sender's own contribution is bit-identical to what every other rank decodes.

Use the unbiased quantizers with methods that need ``E[C(x)] = x`` (plain compressed SGD, DIANA);
with error feedback wrap them with :func:`scale_for_error_feedback` (spec §2.3), which the strategy
does by default. ``scaled_sign`` is already contractive and is the usual EF-signSGD choice.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gmc.compressors.base import (
    CompressionPlan,
    Compressor,
    Payload,
    RandomStreams,
    Segment,
    TensorSpec,
)
from lightning_gmc.compressors.bitpack import (
    pack_bits,
    pack_trits,
    packed_nbytes,
    trit_nbytes,
    unpack_bits,
    unpack_trits,
)
from lightning_gmc.compressors.sparse import Identity

__all__ = [
    "BitBudgetCompressor",
    "GroupPlan",
    "NaturalCompression",
    "NaturalDithering",
    "RandomDithering",
    "ScaledCompressor",
    "ScaledSign",
    "TernGrad",
    "scale_for_error_feedback",
]


class BitBudgetCompressor(Compressor):
    """Common interface of the compressors of issue 4: theory parameters and exact bit counts.

    Subclasses define :meth:`omega` (unbiased ones) or :meth:`delta` (contractive ones) for a single
    parameter of ``numel`` coordinates. For a flat vector made of several parameters the guarantee is
    the worst segment's, because the per-segment errors and squared norms both add
    (:meth:`omega_of_plan`, :meth:`delta_of_plan`).
    """

    shared_support = False
    sparse = False

    def omega(self, numel: int) -> float:
        """Variance parameter ``omega`` of ``U(omega)`` for one parameter of ``numel`` coordinates.

        Raises:
            NotImplementedError: for contractive (biased) compressors, which define :meth:`delta`.
        """
        raise NotImplementedError(f"{type(self).__name__} is not unbiased; use delta()")

    def delta(self, numel: int) -> float:
        """Contraction parameter ``delta`` of ``B(delta)``; for unbiased compressors it is that of the
        error-feedback scaling ``C / (1 + omega)``, i.e. ``1 / (1 + omega)``."""
        return 1.0 / (1.0 + self.omega(numel))

    def omega_of_plan(self, plan: CompressionPlan) -> float:
        """``omega`` of the whole flat vector: the maximum over its segments."""
        return max(self.omega(seg.numel) for seg in plan.segments)

    def delta_of_plan(self, plan: CompressionPlan) -> float:
        """``delta`` of the whole flat vector: the minimum over its segments."""
        return min(self.delta(seg.numel) for seg in plan.segments)


def _private_uniform(
    plan: CompressionPlan,
    counts: Sequence[int],
    like: Tensor,
    rng: RandomStreams,
    step: int,
    stream: str,
    out: Tensor,
) -> Tensor:
    """Fill ``out`` with U[0,1) draws, ``counts[i]`` of them from segment ``i``'s private stream.

    One generator per parameter keeps the draws independent of the bucket layout.
    """
    start = 0
    for seg, n in zip(plan.segments, counts, strict=True):
        if n:
            gen = rng.private(like.device, step, stream, seg.param_index)
            torch.rand(n, generator=gen, device=like.device, out=out[start : start + n])
        start += n
    return out


def _plan_workspace(plan: CompressionPlan, name: str, like: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """A plan-owned scratch buffer, allocated once per device (never part of a returned payload)."""
    key = f"{name}:{like.device}"
    buf = plan.cache.get(key)
    if buf is None or buf.numel() != numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype, device=like.device)
        plan.cache[key] = buf
    return buf


# --------------------------------------------------------------------------------------------------
# Norm groups
# --------------------------------------------------------------------------------------------------


@dataclass
class GroupPlan(CompressionPlan):
    """Layout of the norm groups: per segment, ``full`` groups of ``block`` coordinates then a tail.

    Attributes:
        block: group length per segment (the segment length when groups are whole segments).
        full: number of full groups per segment.
        tail: length of the last, shorter group per segment (0 when there is none).
        group_start: index of each segment's first group.
        groups: total number of groups.
        code_bits: bits per coordinate code (0 for the ternary layout).
    """

    block: tuple[int, ...] = ()
    full: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()
    group_start: tuple[int, ...] = ()
    groups: int = 0
    code_bits: int = 0

    def views(self, t: Tensor) -> Iterator[tuple[Tensor | None, Tensor | None, int, int]]:
        """Per segment: ``(full groups as a (full, block) view or None, tail view or None, first
        group index, number of full groups)``."""
        layout = zip(self.segments, self.block, self.full, self.tail, self.group_start, strict=True)
        for seg, b, f, tl, g0 in layout:
            part = t[seg.offset : seg.offset + seg.numel]
            body = part[: f * b].view(f, b) if f else None
            rest = part[f * b :] if tl else None
            yield body, rest, g0, f

    def reduce_norm(self, x: Tensor, p: float) -> Tensor:
        """``||x_g||_p`` of every group, fp32, shape ``(groups,)``."""
        out = torch.empty(self.groups, dtype=x.dtype, device=x.device)
        for body, rest, g0, f in self.views(x):
            if body is not None:
                torch.linalg.vector_norm(body, ord=p, dim=1, out=out[g0 : g0 + f])
            if rest is not None:
                out[g0 + f] = torch.linalg.vector_norm(rest, ord=p)
        return out

    def scale_(self, t: Tensor, scale: Tensor) -> Tensor:
        """Multiply every coordinate of ``t`` in place by its group's entry of ``scale``."""
        for body, rest, g0, f in self.views(t):
            if body is not None:
                body.mul_(scale[g0 : g0 + f].unsqueeze(1))
            if rest is not None:
                rest.mul_(scale[g0 + f])
        return t

    def lengths(self, device: torch.device) -> Tensor:
        """Group lengths as an fp32 tensor (cached per device)."""
        key = f"group_lengths:{device}"
        cached = self.cache.get(key)
        if cached is None:
            values: list[float] = []
            for b, f, tl in zip(self.block, self.full, self.tail, strict=True):
                values.extend([float(b)] * f)
                if tl:
                    values.append(float(tl))
            cached = torch.tensor(values, dtype=torch.float32, device=device)
            self.cache[key] = cached
        return cached


def _check_block_size(block_size: int | None) -> int | None:
    if block_size is None:
        return None
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
    return block_size


def _check_norm(norm: float | str) -> float:
    value = math.inf if isinstance(norm, str) and norm.lower() in ("inf", "linf", "max") else float(norm)
    if value not in (1.0, 2.0, math.inf):
        raise ValueError(f"norm must be 1, 2 or inf, got {norm!r}")
    return value


class GroupQuantizer(BitBudgetCompressor):
    """Base of the quantizers that send one fp32 scale per norm group plus per-coordinate codes.

    Args:
        block_size: length of a norm group inside a parameter; ``None`` (default) uses one group per
            parameter. Smaller groups lower ``omega`` at 32 bits per group.
    """

    ternary = False  # codes are trits packed five per byte instead of fixed-width bit codes

    def __init__(self, block_size: int | None = None) -> None:
        self.block_size = _check_block_size(block_size)

    @abstractmethod
    def code_bits(self) -> int:
        """Bits per coordinate code (ignored by ternary layouts)."""

    def group_length(self, numel: int) -> int:
        """Length of the largest norm group in a parameter of ``numel`` coordinates."""
        return numel if self.block_size is None else min(self.block_size, numel)

    def plan(self, segments: Sequence[Segment]) -> GroupPlan:
        block, full, tail, start = [], [], [], []
        groups = 0
        for seg in segments:
            if seg.numel <= 0:
                raise ValueError(f"empty segment {seg}")
            b = seg.numel if self.block_size is None else min(self.block_size, seg.numel)
            f, tl = divmod(seg.numel, b)
            block.append(b)
            full.append(f)
            tail.append(tl)
            start.append(groups)
            groups += f + (1 if tl else 0)
        numel = sum(s.numel for s in segments)
        bits = 0 if self.ternary else self.code_bits()
        nbytes = trit_nbytes(numel) if self.ternary else packed_nbytes(numel, bits)
        specs = (TensorSpec("scales", torch.float32, groups), TensorSpec("codes", torch.uint8, nbytes))
        return GroupPlan(
            tuple(segments),
            numel,
            specs,
            block=tuple(block),
            full=tuple(full),
            tail=tuple(tail),
            group_start=tuple(start),
            groups=groups,
            code_bits=bits,
        )

    def payload_bits(self, plan: CompressionPlan) -> int:
        assert isinstance(plan, GroupPlan)
        code = 8 * trit_nbytes(plan.numel) if self.ternary else plan.numel * plan.code_bits
        return 32 * plan.groups + code

    def describe(self) -> str:
        block = "" if self.block_size is None else f", block_size={self.block_size}"
        return f"{self.name}{block}"


class _LevelDithering(GroupQuantizer):
    """Random dithering onto ``s + 1`` levels of ``|x_i| / ||x_g||_p`` with a sign bit per code."""

    unbiased = True

    def __init__(self, levels: int = 1, norm: float | str = 2.0, block_size: int | None = None) -> None:
        super().__init__(block_size)
        levels = int(levels)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = levels
        self.norm = _check_norm(norm)

    def code_bits(self) -> int:
        # sign + level index in [0, s]: the fixed-length code of spec §6 row 4.
        return 1 + math.ceil(math.log2(self.levels + 1))

    def describe(self) -> str:
        return f"{super().describe()}, levels={self.levels}, norm={self.norm:g}"

    @abstractmethod
    def _level_index(self, y: Tensor, u: Tensor) -> Tensor:
        """Random level index in ``[0, s]`` of ``y = |x| / ||x||_p`` (in ``[0, 1]``), unbiased."""

    @abstractmethod
    def _level_value(self, index: Tensor) -> Tensor:
        """Value (in units of the group norm) of a level index."""

    def compress(self, x: Tensor, plan: CompressionPlan, rng: RandomStreams, step: int) -> Payload:
        assert isinstance(plan, GroupPlan)
        norms = plan.reduce_norm(x, self.norm)
        inv = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
        y = _plan_workspace(plan, "y", x, plan.numel, torch.float32)
        torch.abs(x, out=y)
        plan.scale_(y, inv)
        u = _plan_workspace(plan, "u", x, plan.numel, torch.float32)
        _private_uniform(plan, [s.numel for s in plan.segments], x, rng, step, self.name, u)
        index = self._level_index(y, u)
        # code = (level << 1) | sign, sign = 1 for negative coordinates.
        code = index.bitwise_left_shift_(1).bitwise_or_(torch.signbit(x).to(index.dtype))
        return Payload({"scales": norms, "codes": pack_bits(code, plan.code_bits)})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        assert isinstance(plan, GroupPlan)
        code = unpack_bits(payload.tensors["codes"], plan.code_bits, plan.numel)
        value = self._level_value(code.bitwise_right_shift(1))
        value.mul_(code.bitwise_and_(1).mul_(-2).add_(1))  # 1 - 2 * sign_bit
        plan.scale_(value, payload.tensors["scales"])
        out.add_(value)


class RandomDithering(_LevelDithering):
    """Random dithering / QSGD with ``s`` uniform levels (spec §6 rows 4 and 4').

    ``C(x) = ||x||_p * sign(x) * xi / s`` with ``xi_i = floor(y_i) + Bernoulli(frac(y_i))`` and
    ``y_i = s |x_i| / ||x||_p``: unbiased, with ``omega = min(d^{2/r}/(4 s^2), d^{1/r}/s)`` and
    ``r = min(p, 2)`` (spec row 4'; for ``p = 2`` this is the QSGD bound ``min(d/s^2, sqrt(d)/s)``
    improved by the factor 1/4 on its first term, derived from ``f(1-f) <= 1/4``). Bits:
    ``32`` per norm group ``+ d (1 + ceil(log2(s+1)))``.

    Use it as the classic quantization baseline; with a small ``block_size`` (QSGD uses 512) it is a
    robust 2-4 bit/coordinate compressor. ``p = 1`` with the same dense code is sparse dithering's
    unconstrained cousin (see ``sd_l1`` for the bit-efficient sparse code).

    Args:
        levels: number of quantization levels ``s >= 1``.
        norm: ``2`` (QSGD), ``inf`` or ``1``: the norm that scales each group.
        block_size: norm-group length inside a parameter, ``None`` for one group per parameter.
    """

    name = "qsgd"

    def omega(self, numel: int) -> float:
        d = self.group_length(numel)
        r = min(self.norm, 2.0)
        s = self.levels
        return min(d ** (2.0 / r) / (4.0 * s * s), d ** (1.0 / r) / s)

    def _level_index(self, y: Tensor, u: Tensor) -> Tensor:
        y.mul_(self.levels)
        low = torch.floor(y)
        # u < frac(y) rounds up with probability frac(y): unbiased. Rounding noise in ||x|| can push y
        # a hair above s, hence the clamp.
        up = torch.lt(u, y.sub_(low))
        return low.add_(up).clamp_(max=self.levels).to(torch.int64)

    def _level_value(self, index: Tensor) -> Tensor:
        return index.to(torch.float32).div_(self.levels)


class NaturalDithering(_LevelDithering):
    """Natural dithering (Horváth et al.; spec §6 row 6): dithering onto the power-of-two levels
    ``{0, 2^{1-s}, ..., 1/2, 1}`` of ``|x_i| / ||x||_p``.

    Unbiased with ``omega = 1/8 + d^{1/r} 2^{1-s} min(1, d^{1/r} 2^{1-s})``, ``r = min(p, 2)``; bits
    ``32`` per group ``+ d (1 + ceil(log2(s+1)))``. The levels follow the exponent grid, so large
    entries keep ~1/8 relative variance like natural compression while small ones are dithered to
    zero; a good 3-5 bit/coordinate choice.

    Args:
        levels: number of non-zero levels ``s >= 1``.
        norm: ``2`` (default), ``inf`` or ``1``.
        block_size: norm-group length inside a parameter, ``None`` for one group per parameter.
    """

    name = "natural_dithering"

    def omega(self, numel: int) -> float:
        d = self.group_length(numel)
        r = min(self.norm, 2.0)
        t = d ** (1.0 / r) * 2.0 ** (1 - self.levels)
        return 0.125 + t * min(1.0, t)

    def _level_index(self, y: Tensor, u: Tensor) -> Tensor:
        s = self.levels
        mantissa, exponent = torch.frexp(y)  # y = m 2^E, m in [0.5, 1): floor(log2 y) = E - 1
        exponent = exponent.to(torch.int64).sub_(1)
        on_grid = exponent.ge(1 - s)
        # Between 2^e and 2^(e+1): P(up) = (y - 2^e) / 2^e = 2m - 1.
        # Below the smallest level 2^(1-s): between 0 and 2^(1-s), P(up) = y / 2^(1-s).
        p_up = torch.where(on_grid, mantissa.mul_(2.0).sub_(1.0), y.mul(2.0 ** (s - 1)))
        low = torch.where(on_grid, exponent.add_(s), torch.zeros_like(exponent))
        return low.add_(torch.lt(u, p_up)).clamp_(max=s)

    def _level_value(self, index: Tensor) -> Tensor:
        ones = torch.ones(index.shape, dtype=torch.float32, device=index.device)
        value = torch.ldexp(ones, index - self.levels)
        return value.masked_fill_(index.eq(0), 0.0)


_TRIT_VALUES = torch.tensor([0.0, 1.0, -1.0])


class TernGrad(GroupQuantizer):
    """TernGrad (spec §6 row 7): ``C(x) = ||x||_inf sign(x) b`` with ``b_i ~ Bernoulli(|x_i| / ||x||_inf)``.

    Unbiased with worst-case ``omega = (sqrt(d) - 1) / 2`` (about 3 for Gaussian x at any large d).
    The trits are packed five per byte: ``32`` per group ``+ 8 ceil(d / 5)`` bits, 1.6 bits per
    coordinate against the entropy ``log2 3 = 1.585``. No gradient clipping (GRACE's 2.5 std clip
    makes it biased).

    Args:
        block_size: norm-group length inside a parameter, ``None`` for one group per parameter.
    """

    name = "terngrad"
    unbiased = True
    ternary = True

    def code_bits(self) -> int:
        return 0

    def omega(self, numel: int) -> float:
        return (math.sqrt(self.group_length(numel)) - 1.0) / 2.0

    def compress(self, x: Tensor, plan: CompressionPlan, rng: RandomStreams, step: int) -> Payload:
        assert isinstance(plan, GroupPlan)
        scale = plan.reduce_norm(x, math.inf)
        inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
        y = _plan_workspace(plan, "y", x, plan.numel, torch.float32)
        plan.scale_(torch.abs(x, out=y), inv)
        u = _plan_workspace(plan, "u", x, plan.numel, torch.float32)
        _private_uniform(plan, [s.numel for s in plan.segments], x, rng, step, self.name, u)
        keep = torch.lt(u, y)
        # trit = 0 (zero), 1 (+scale), 2 (-scale)
        trits = torch.signbit(x).to(torch.uint8).add_(1).mul_(keep)
        return Payload({"scales": scale, "codes": pack_trits(trits)})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        assert isinstance(plan, GroupPlan)
        trits = unpack_trits(payload.tensors["codes"], plan.numel)
        # 0 -> 0, 1 -> +1, 2 -> -1
        value = _TRIT_VALUES.to(out.device)[trits.long()]
        plan.scale_(value, payload.tensors["scales"])
        out.add_(value)


class ScaledSign(GroupQuantizer):
    """Scaled sign / EF-signSGD (Karimireddy et al.; spec §6 row 9): ``C(x) = (||x||_1 / d) sign(x)``.

    Deterministic and contractive with ``delta(x) = ||x||_1^2 / (d ||x||^2)``: worst case ``1/d``
    (one-hot x), about ``2/pi = 0.637`` for Gaussian x. Bits: ``32`` per group ``+ d``. Zeros are sent
    as ``+``; that does not change ``delta`` because ``<C(x), x> = ||x||_1^2 / d`` either way. Use it
    with error feedback only (it is biased); ``block_size`` raises the worst case to
    ``1 / block_size``.

    Args:
        block_size: norm-group length inside a parameter, ``None`` for one group per parameter.
    """

    name = "scaled_sign"
    unbiased = False

    def code_bits(self) -> int:
        return 1

    def delta(self, numel: int) -> float:
        return 1.0 / self.group_length(numel)

    def compress(self, x: Tensor, plan: CompressionPlan, rng: RandomStreams, step: int) -> Payload:
        assert isinstance(plan, GroupPlan)
        scale = plan.reduce_norm(x, 1.0).div_(plan.lengths(x.device))
        return Payload({"scales": scale, "codes": pack_bits(torch.signbit(x), 1)})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        assert isinstance(plan, GroupPlan)
        bits = unpack_bits(payload.tensors["codes"], 1, plan.numel)
        value = bits.to(torch.float32).mul_(-2.0).add_(1.0)
        plan.scale_(value, payload.tensors["scales"])
        out.add_(value)


# --------------------------------------------------------------------------------------------------
# Natural compression
# --------------------------------------------------------------------------------------------------


@dataclass
class ElementPlan(CompressionPlan):
    """Plan of compressors that code every coordinate independently (no scales)."""

    code_bits: int = 0


class NaturalCompression(BitBudgetCompressor):
    """Natural compression ``C_nat`` (Horváth et al.; spec §6 row 5).

    Every ``|x_i|`` is rounded to ``2^floor(log2|x_i|)`` or ``2^ceil(log2|x_i|)`` without bias
    (``P(down) = (2^ceil - |x_i|) / 2^floor``) and keeps its sign. Unbiased with ``omega = 1/8``
    (attained at ``|x_i| = (4/3) 2^e``). It reads the fp32 bit pattern directly: the code is the sign
    and the (possibly incremented) 8-bit exponent, **9 bits per coordinate**, no scale. Subnormals
    dither between 0 and ``2^-126`` (unbiased, larger relative variance); values within a factor 2
    of the fp32 maximum may round up to ``inf``; NaN is sent as ``inf``.

    Use it when a near-lossless, dimension-free 3.56x reduction is wanted, or as the inner
    compressor of other schemes (SC-RC's 8-bit norms use the same rounding).
    """

    name = "natural"
    unbiased = True

    def omega(self, numel: int) -> float:
        return 0.125

    def plan(self, segments: Sequence[Segment]) -> ElementPlan:
        numel = sum(s.numel for s in segments)
        return ElementPlan(
            tuple(segments), numel, (TensorSpec("codes", torch.uint8, packed_nbytes(numel, 9)),), code_bits=9
        )

    def payload_bits(self, plan: CompressionPlan) -> int:
        return 9 * plan.numel

    def compress(self, x: Tensor, plan: CompressionPlan, rng: RandomStreams, step: int) -> Payload:
        u = _plan_workspace(plan, "u", x, plan.numel, torch.float32)
        _private_uniform(plan, [s.numel for s in plan.segments], x, rng, step, self.name, u)
        return Payload({"codes": pack_bits(natural_encode(x, u), 9)})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        out.add_(natural_decode(unpack_bits(payload.tensors["codes"], 9, plan.numel)))


def natural_encode(x: Tensor, u: Tensor) -> Tensor:
    """9-bit natural-compression codes ``(sign << 8) | exponent`` of fp32 ``x`` given uniforms ``u``.

    With ``|x| = 2^(e-127) (1 + m / 2^23)`` the probability of rounding up is ``m / 2^23``; for
    subnormals (``e = 0``) the same formula dithers between 0 and ``2^-126``.
    """
    bits = x.contiguous().view(torch.int32)
    exponent = bits.bitwise_right_shift(23).bitwise_and_(0xFF)
    p_up = bits.bitwise_and(0x7FFFFF).to(torch.float32).mul_(2.0**-23)
    exponent.add_(torch.lt(u, p_up)).clamp_(max=255)
    return exponent.bitwise_or_(torch.signbit(x).to(torch.int32).bitwise_left_shift_(8))


def natural_decode(codes: Tensor) -> Tensor:
    """fp32 values of 9-bit natural-compression codes."""
    exponent = codes.bitwise_and(0xFF).to(torch.int32).bitwise_left_shift_(23)
    value = exponent.view(torch.float32)
    negative = codes.bitwise_right_shift(8).bool()
    return torch.where(negative, -value, value)


# --------------------------------------------------------------------------------------------------
# Error-feedback scaling (spec §2.3)
# --------------------------------------------------------------------------------------------------


@dataclass
class ScaledPlan(CompressionPlan):
    """Plan of :class:`ScaledCompressor`: the inner plan and one factor per segment."""

    inner: CompressionPlan | None = None
    factors: tuple[float, ...] = ()


class ScaledCompressor(Compressor):
    """``C'(x) = C(x) / (1 + omega)`` for an unbiased ``C`` in ``U(omega)`` (spec §2.3, A.2).

    ``C'`` is contractive with ``delta = 1 / (1 + omega)`` and sends exactly the bits of ``C``: the
    receivers decode and rescale. Use it whenever an unbiased compressor feeds an error-feedback
    method (EF-SGD, GMC, EF21): plain unbiased compressors have ``E||C(x) - x||^2 = omega ||x||^2``,
    which exceeds ``||x||^2`` when ``omega > 1`` and makes the residual grow. Do not use it with
    methods that rely on ``E[C(x)] = x`` (DIANA, plain compressed SGD without memory).

    The factor is per parameter, ``1 / (1 + omega(numel))`` with that parameter's ``omega``: for one
    parameter this is exactly ``C / (1 + omega)``; for several, each segment is contractive on its
    own, hence the whole vector with the smallest ``delta``.

    Args:
        inner: an unbiased compressor with an ``omega(numel)`` method.
    """

    name = "scaled"
    unbiased = False
    sparse = False

    def __init__(self, inner: Compressor) -> None:
        omega = getattr(inner, "omega", None)
        if not inner.unbiased or omega is None:
            raise TypeError(f"{inner!r} must be unbiased and define omega(numel) to be scaled by 1/(1+omega)")
        if inner.shared_support:
            raise TypeError(f"{inner!r}: scaling shared-support compressors is not supported")
        self.inner = inner

    def omega_of(self, numel: int) -> float:
        """``omega`` of the inner compressor for one parameter."""
        return float(self.inner.omega(numel))  # type: ignore[attr-defined]

    def delta(self, numel: int) -> float:
        """Contraction parameter ``1 / (1 + omega)``."""
        return 1.0 / (1.0 + self.omega_of(numel))

    def delta_of_plan(self, plan: CompressionPlan) -> float:
        return min(self.delta(seg.numel) for seg in plan.segments)

    def plan(self, segments: Sequence[Segment]) -> ScaledPlan:
        inner = self.inner.plan(segments)
        factors = tuple(1.0 / (1.0 + self.omega_of(seg.numel)) for seg in inner.segments)
        return ScaledPlan(inner.segments, inner.numel, inner.payload, inner=inner, factors=factors)

    def compress(self, x: Tensor, plan: CompressionPlan, rng: RandomStreams, step: int) -> Payload:
        assert isinstance(plan, ScaledPlan) and plan.inner is not None
        return self.inner.compress(x, plan.inner, rng, step)

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        assert isinstance(plan, ScaledPlan) and plan.inner is not None
        decoded = _plan_workspace(plan, "decoded", out, plan.numel, out.dtype)
        decoded.zero_()
        self.inner.decompress_add(payload, plan.inner, decoded)
        for seg, factor in zip(plan.segments, plan.factors, strict=True):
            sl = slice(seg.offset, seg.offset + seg.numel)
            out[sl].add_(decoded[sl], alpha=factor)

    def nnz(self, plan: CompressionPlan) -> int:
        assert isinstance(plan, ScaledPlan) and plan.inner is not None
        return self.inner.nnz(plan.inner)

    def payload_bits(self, plan: CompressionPlan) -> int:
        assert isinstance(plan, ScaledPlan) and plan.inner is not None
        return self.inner.payload_bits(plan.inner)

    def broadcast_bits(self, payloads: Sequence[Payload], plan: CompressionPlan) -> int:
        assert isinstance(plan, ScaledPlan) and plan.inner is not None
        return self.inner.broadcast_bits(payloads, plan.inner)

    def describe(self) -> str:
        return f"{self.inner.describe()}, scaled by 1/(1+omega)"


def scale_for_error_feedback(compressor: Compressor) -> Compressor:
    """Return the compressor to use inside an error-feedback method (spec §2.3).

    * unbiased with ``omega > 0`` (``qsgd``, ``natural``, ``natural_dithering``, ``terngrad``,
      ``sd_l1``, ``spherical_rc`` unbiased variant): wrapped in :class:`ScaledCompressor`;
    * already contractive (``scaled_sign``, ``topk``, ``spherical_rc`` contractive variant, ...) or
      exact (``none``): returned unchanged.

    Raises:
        TypeError: an unbiased compressor without an ``omega(numel)`` method (its scaling is unknown).
    """
    if isinstance(compressor, ScaledCompressor) or not compressor.unbiased:
        return compressor
    if isinstance(compressor, Identity):
        return compressor
    if getattr(compressor, "omega", None) is None:
        raise TypeError(f"{compressor!r} is unbiased but defines no omega(numel); cannot scale it for EF")
    return ScaledCompressor(compressor)
