"""Common base of the bit-budget compressors and the norm-group layout of the group quantizers."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from lightning_gmc._arguments import check_int, describe_value
from lightning_gmc.compressors.base import (
    CompressionPlan,
    Compressor,
    RandomStreams,
    Segment,
    TensorSpec,
)
from lightning_gmc.compressors.bitpack import packed_nbytes, trit_nbytes

__all__ = ["BitBudgetCompressor", "GroupPlan", "GroupQuantizer", "private_uniform"]


@dataclass(frozen=True)
class BitBudgetCompressor(Compressor):
    """Common interface of the bit-budget compressors: theory parameters and exact bit counts.

    Subclasses define :meth:`omega` (unbiased ones) or :meth:`delta` (contractive ones) for a single
    parameter of ``numel`` coordinates. For a flat vector made of several parameters the guarantee is
    the worst segment's, because the per-segment errors and squared norms both add
    (:meth:`omega_of_plan`, :meth:`delta_of_plan`).
    """

    shared_support: ClassVar[bool] = False
    sparse: ClassVar[bool] = False

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


def private_uniform(
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


@dataclass(frozen=True)
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
        """Group lengths as an fp32 tensor (built once per device)."""

        def build() -> Tensor:
            values: list[float] = []
            for b, f, tl in zip(self.block, self.full, self.tail, strict=True):
                values.extend([float(b)] * f)
                if tl:
                    values.append(float(tl))
            return torch.tensor(values, dtype=torch.float32, device=device)

        return self.workspace.constant("group_lengths", device, build)


def check_block_size(block_size: object) -> int | None:
    return check_int("block_size", block_size, minimum=1, optional=True)


def check_norm(norm: object) -> float:
    """The norm of a quantizer's groups: 1, 2 or inf (also the strings ``"inf"``, ``"linf"``, ``"max"``)."""
    if isinstance(norm, str) and norm.lower() in ("inf", "linf", "max"):
        return math.inf
    if isinstance(norm, bool) or not isinstance(norm, int | float) or float(norm) not in (1.0, 2.0, math.inf):
        raise ValueError(f"norm must be 1, 2 or inf, got {describe_value(norm)}")
    return float(norm)


@dataclass(frozen=True)
class GroupQuantizer(BitBudgetCompressor):
    """Base of the quantizers that send one fp32 scale per norm group plus per-coordinate codes.

    Args:
        block_size: length of a norm group inside a parameter (keyword only); ``None`` (default)
            uses one group per parameter. Smaller groups lower ``omega`` at 32 bits per group.
    """

    #: codes are trits packed five per byte instead of fixed-width bit codes
    ternary: ClassVar[bool] = False
    block_size: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_size", check_block_size(self.block_size))

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
