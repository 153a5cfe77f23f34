"""Identity and sparsifying compressors: ``none``, ``topk``, ``topk_approx``, ``randk``, ``rbgs``.

All sparsifiers keep ``k = max(1, floor(density * n))`` coordinates of every segment (parameter) and
send them as values in ``wire_dtype`` (fp32 by default; bf16/fp16 round the values inside ``C``,
see :mod:`lightning_gmc.compressors.wire`), plus int32 segment-global indices when the support is
private to the rank. Indices are bucket-local (offset into the flat vector), so 32 bits always suffice.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_gmc._arguments import check_float
from lightning_gmc.compressors.base import (
    CompressionPlan,
    Compressor,
    Payload,
    RandomStreams,
    Segment,
    TensorSpec,
    mix_seed,
    selected_count,
)
from lightning_gmc.compressors.selection import mask_nonzero, random_subset
from lightning_gmc.compressors.wire import check_wire_dtype, wire_torch_dtype
from lightning_gmc.compressors.workspace import Workspace

__all__ = ["Identity", "RandomBlock", "RandomK", "SparseCompressor", "TopK", "TopKApprox"]


def _check_fraction(name: str, value: object) -> float:
    fraction = check_float(name, value, "in (0, 1]")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return fraction


def _value_bits(dtype: torch.dtype) -> int:
    return 8 * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Identity(Compressor):
    """``C(x) = x``: dense all-reduce. With it every method reduces to its uncompressed form.

    Args:
        wire_dtype: ``"fp32"`` (exact), ``"bf16"`` or ``"fp16"``: ``C(x)`` is ``x`` rounded to it
            (:mod:`lightning_gmc.compressors.wire`).
    """

    name: ClassVar[str] = "none"
    shared_support: ClassVar[bool] = True
    sparse: ClassVar[bool] = False
    unbiased = True
    wire_dtype: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "wire_dtype", check_wire_dtype(self.wire_dtype))

    @property
    def sends_input(self) -> bool:
        return self.wire_dtype == "fp32"  # a 16-bit wire rounds: C(x) != x

    @property
    def value_dtype(self) -> torch.dtype:
        return wire_torch_dtype(self.wire_dtype)

    def describe(self) -> str:
        return self.name if self.wire_dtype == "fp32" else f"{self.name}, wire_dtype={self.wire_dtype}"

    def plan(self, segments: Sequence[Segment]) -> CompressionPlan:
        numel = sum(s.numel for s in segments)
        return CompressionPlan(tuple(segments), numel, (TensorSpec("values", self.value_dtype, numel),))

    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        if workspace is None:
            return Payload({"values": x.to(self.value_dtype, copy=True)})
        # The caller's message slot owns the values: the transport reduces them in place, so they
        # must not be shared with another message in flight.
        values = workspace.tensor("values", plan.numel, self.value_dtype, x.device)
        values.copy_(x)  # rounds to nearest for a 16-bit wire
        return Payload({"values": values})

    def wrap_input(self, x: Tensor, plan: CompressionPlan) -> Payload:
        if not self.sends_input:
            return super().wrap_input(x, plan)  # raises: a 16-bit wire cannot send x as is
        return Payload({"values": x})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        out.add_(payload.tensors["values"])  # a 16-bit value widens to fp32 exactly

    def decode_summed(self, summed: Payload, plan: CompressionPlan, out: Tensor, world_size: int) -> Tensor:
        values = summed.tensors["values"]
        if values.dtype != out.dtype:
            out.copy_(values).add_(0.0)  # a 16-bit value widens exactly; +0.0 as below
        else:
            # 0 + v, as the default's zero_() + add_() gives (it turns -0.0 into +0.0), one pass fewer.
            torch.add(values, 0.0, out=out)
        # no division by K = 1 (x / 1 == x)
        return out if world_size == 1 else out.div_(world_size)

    def subtract_own(self, x: Tensor, payload: Payload, plan: CompressionPlan, workspace: Tensor) -> None:
        if self.wire_dtype == "fp32":
            x.zero_()
        else:  # the rounding error stays: x - round(x) is exact in fp32
            x.sub_(payload.tensors["values"])

    def broadcast_bits(self, payloads: Sequence[Payload], plan: CompressionPlan) -> int:
        return _value_bits(self.value_dtype) * plan.numel


@dataclass(frozen=True)
class SparsePlan(CompressionPlan):
    """Selected count per segment, and their total."""

    counts: tuple[int, ...] = ()
    total: int = 0


@dataclass(frozen=True)
class SparseCompressor(Compressor):
    """Common code of the sparsifiers: per-segment counts, index payloads, exact residual zeroing.

    Args:
        density: fraction of each parameter's coordinates that is sent, in (0, 1].
        wire_dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype the selected values are rounded
            to and sent in (:mod:`lightning_gmc.compressors.wire`).
    """

    sparse: ClassVar[bool] = True
    density: float = 0.01
    wire_dtype: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "density", _check_fraction("density", self.density))
        object.__setattr__(self, "wire_dtype", check_wire_dtype(self.wire_dtype))

    @property
    def value_dtype(self) -> torch.dtype:
        return wire_torch_dtype(self.wire_dtype)

    def describe(self) -> str:
        wire = "" if self.wire_dtype == "fp32" else f", wire_dtype={self.wire_dtype}"
        return f"{self.name}, density={self.density:g}{wire}"

    def plan(self, segments: Sequence[Segment]) -> SparsePlan:
        counts = tuple(selected_count(self.density, s.numel) for s in segments)
        total = sum(counts)
        numel = sum(s.numel for s in segments)
        specs = [TensorSpec("values", self.value_dtype, total)]
        if not self.shared_support:
            specs.append(TensorSpec("indices", torch.int32, total))
        return SparsePlan(tuple(segments), numel, tuple(specs), counts=counts, total=total)

    @abstractmethod
    def select(self, x: Tensor, plan: SparsePlan, rng: RandomStreams, step: int) -> Tensor:
        """Flat int64 indices (``plan.total`` of them, unique) of the coordinates to send."""

    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        assert isinstance(plan, SparsePlan)
        index = self.select(x, plan, rng, step)
        return self._payload_at(x, index)

    def _payload_at(self, x: Tensor, index: Tensor) -> Payload:
        values = x.index_select(0, index)
        if values.dtype != self.value_dtype:
            values = values.to(self.value_dtype)  # C(x) is the rounded vector
        if self.shared_support:
            return Payload({"values": values}, {"index": index})
        return Payload({"values": values, "indices": index.to(torch.int32)}, {"index": index})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        index = payload.context.get("index")
        if index is None:  # a payload received from another rank: index_add_ takes int32 directly
            index = payload.tensors["indices"]
        # Indices within one payload are unique, so index_add_ is deterministic even on CUDA.
        out.index_add_(0, index, payload.tensors["values"].to(out.dtype))

    def decode_summed(self, summed: Payload, plan: CompressionPlan, out: Tensor, world_size: int) -> Tensor:
        index = summed.context.get("index")
        if index is None:
            return super().decode_summed(summed, plan, out, world_size)
        # Divide the k values instead of all of out. Every selected coordinate of the default is
        # (0 + v) / K: values.add_(0.0) reproduces the 0 + v (-0.0 -> +0.0), and index_copy_ stores
        # the quotient as is.
        out.zero_()
        values = summed.tensors["values"]
        if values.dtype != out.dtype:
            values = values.to(out.dtype)  # divide in fp32, as the default path does
        values = values.add_(0.0)
        return out.index_copy_(0, index, values if world_size == 1 else values.div_(world_size))

    def subtract_own(self, x: Tensor, payload: Payload, plan: CompressionPlan, workspace: Tensor) -> None:
        index = payload.context["index"]
        if self.wire_dtype == "fp32":
            # x - C(x) is exactly x with the sent coordinates zeroed (no rounding).
            x.index_fill_(0, index, 0.0)
        else:  # x - round(x) at the sent coordinates (exact in fp32): the rounding error stays
            x.index_add_(0, index, payload.tensors["values"].to(x.dtype), alpha=-1.0)

    def value_counts(self, plan: CompressionPlan) -> tuple[int, ...]:
        assert isinstance(plan, SparsePlan)
        return plan.counts

    def nnz(self, plan: CompressionPlan) -> int:
        assert isinstance(plan, SparsePlan)
        return plan.total

    def broadcast_bits(self, payloads: Sequence[Payload], plan: CompressionPlan) -> int:
        assert isinstance(plan, SparsePlan)
        value_bits = _value_bits(self.value_dtype)
        if self.shared_support:  # all ranks share one support: the sum has the same k coordinates
            return value_bits * plan.total
        union = torch.unique(torch.cat([p.tensors["indices"] for p in payloads])).numel()
        return (value_bits + 32) * union  # value + index per coordinate of the union, as the paper counts


@dataclass(frozen=True)
class TopK(SparseCompressor):
    """Exact top-k by magnitude, per parameter (``torch.topk``). Contractive with ``delta = density``.

    Exact selection is the accuracy reference but slow on large tensors (about 58x a memory copy at
    25M floats on CPU, see ``docs/benchmarks.md``); prefer ``topk_approx`` for big models.
    """

    name: ClassVar[str] = "topk"
    shared_support: ClassVar[bool] = False

    def select(self, x: Tensor, plan: SparsePlan, rng: RandomStreams, step: int) -> Tensor:
        magnitude = plan.workspace.tensor("abs", plan.numel, x.dtype, x.device)
        torch.abs(x, out=magnitude)
        parts = []
        for seg, k in zip(plan.segments, plan.counts, strict=True):
            chunk = magnitude[seg.offset : seg.offset + seg.numel]
            if k == seg.numel:
                parts.append(torch.arange(seg.offset, seg.offset + k, device=x.device))
            else:
                parts.append(torch.topk(chunk, k, sorted=False).indices.add_(seg.offset))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(frozen=True)
class TopKApprox(SparseCompressor):
    """Sampled-threshold top-k (Lin et al. 2018, DGC), then exactly ``k`` per parameter.

    For each parameter: take a strided sample of ``|x|`` (size ``max(ceil(sample_ratio * n),
    ceil(2 / density))``, random offset), use as threshold a value slightly below the sample's top
    ``density`` quantile (so that at least ``k`` coordinates pass with high probability), keep the
    candidates ``|x| >= threshold`` and, when there are more than ``k``, the ``k`` largest among them
    (DGC's hierarchical re-selection). When the threshold overshoots and fewer than
    ``k`` candidates pass, the parameter falls back to exact top-k. The count is therefore always
    exactly ``k``, which keeps the all-gather fixed-size.

    Args:
        density: fraction kept per parameter.
        sample_ratio: sampled fraction of each parameter (DGC clamps it to >= 1%).
    """

    name: ClassVar[str] = "topk_approx"
    shared_support: ClassVar[bool] = False
    sample_ratio: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "sample_ratio", _check_fraction("sample_ratio", self.sample_ratio))

    def describe(self) -> str:
        return f"{super().describe()}, sample_ratio={self.sample_ratio:g}"

    def select(self, x: Tensor, plan: SparsePlan, rng: RandomStreams, step: int) -> Tensor:
        magnitude = plan.workspace.tensor("abs", plan.numel, x.dtype, x.device)
        torch.abs(x, out=magnitude)
        # One bool mask, reused by every segment and step (a 1 B/param workspace instead of a fresh
        # d-sized allocation per step); padded to whole 8-byte words for mask_nonzero.
        longest = max(s.numel for s in plan.segments)
        mask = plan.workspace.tensor("mask", -(-longest // 8) * 8, torch.bool, x.device)
        parts = []
        for seg, k in zip(plan.segments, plan.counts, strict=True):
            chunk = magnitude[seg.offset : seg.offset + seg.numel]
            parts.append(self._select_segment(chunk, k, rng, step, seg, mask).add_(seg.offset))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _select_segment(
        self, chunk: Tensor, k: int, rng: RandomStreams, step: int, seg: Segment, mask: Tensor
    ) -> Tensor:
        n = chunk.numel()
        num_samples = max(math.ceil(self.sample_ratio * n), math.ceil(2.0 / self.density))
        if k == n or num_samples >= n // 2:
            # Sampling buys nothing on small parameters: select exactly.
            return torch.topk(chunk, k, sorted=False).indices
        stride = n // num_samples
        start = mix_seed(rng.seed, step, seg.param_index, rng.rank) % stride
        samples = chunk[start::stride]
        # Take the threshold a little below the sample's k/n quantile (expected count plus three
        # standard deviations): an unbiased estimate lets fewer than k values pass about half the time,
        # which would send the parameter to the exact-top-k fallback. The k largest of the candidates
        # are then selected exactly, as in DGC's hierarchical re-selection.
        expected = samples.numel() * k / n
        top_samples = min(samples.numel(), max(1, math.ceil(1.1 * expected + 3 * math.sqrt(expected) + 1)))
        threshold = torch.topk(samples, top_samples, sorted=False).values.min()
        candidates = mask_nonzero(torch.ge(chunk, threshold, out=mask[:n]), mask)
        if candidates.numel() < k:
            return torch.topk(chunk, k, sorted=False).indices
        if candidates.numel() > k:
            # index_select, not advanced indexing: same result, several times faster on CPU.
            best = torch.topk(chunk.index_select(0, candidates), k, sorted=False).indices
            candidates = candidates.index_select(0, best)
        return candidates


@dataclass(frozen=True)
class RandomK(SparseCompressor):
    """Uniform random-k per parameter from a seed shared by all ranks (all-reduce compatible).

    Every rank draws the same ``k`` indices, so only values are sent. Biased as used here (no
    ``d/k`` rescaling), contractive with ``delta = density`` in expectation.
    """

    name: ClassVar[str] = "randk"
    shared_support: ClassVar[bool] = True

    def select(self, x: Tensor, plan: SparsePlan, rng: RandomStreams, step: int) -> Tensor:
        parts = []
        for seg, k in zip(plan.segments, plan.counts, strict=True):
            if k == seg.numel:
                parts.append(torch.arange(seg.offset, seg.offset + k, device=x.device))
                continue
            gen = rng.shared(x.device, step, self.name, seg.param_index)
            parts.append(random_subset(seg.numel, k, gen, x.device).add_(seg.offset))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(frozen=True)
class RandomBlock(SparseCompressor):
    """RBGS: one contiguous block of ``k`` coordinates per parameter, random start, wrap-around.

    The start of each parameter's block is drawn from a seed shared by all ranks (GMC paper §4 and §5.2;
    ``docs/algorithms.md`` 3.6), so no
    indices are sent and the values are summed with one all-reduce. Selection is O(k). Every
    coordinate is in the block with probability ``k / n``: contractive with ``delta = density`` in
    expectation.
    """

    name: ClassVar[str] = "rbgs"
    shared_support: ClassVar[bool] = True

    def block_starts(self, plan: SparsePlan, rng: RandomStreams, step: int) -> list[int]:
        """Start of every segment's block at ``step`` (a counter-based hash of seed, step, parameter)."""
        stream = mix_seed(*self.name.encode())
        return [mix_seed(rng.seed, step, stream, seg.param_index) % seg.numel for seg in plan.segments]

    def select(self, x: Tensor, plan: SparsePlan, rng: RandomStreams, step: int) -> Tensor:
        template = plan.workspace.constant("template", x.device, lambda: _block_template(plan, x.device))
        position, lengths, offsets, owner = template
        starts = torch.tensor(self.block_starts(plan, rng, step), dtype=torch.int64).to(
            x.device, non_blocking=True
        )
        return (position + starts[owner]).remainder_(lengths).add_(offsets)


def _block_template(plan: SparsePlan, device: torch.device) -> Tensor:
    """Per selected element: position inside its block, segment length, segment offset, and which
    segment it belongs to (a ``(4, total)`` int64 tensor, built once per plan and device)."""
    counts = torch.tensor(plan.counts, device=device)
    position = torch.cat([torch.arange(k, device=device) for k in plan.counts])
    lengths = torch.tensor([s.numel for s in plan.segments], device=device)
    offsets = torch.tensor([s.offset for s in plan.segments], device=device)
    return torch.stack(
        [
            position,
            lengths.repeat_interleave(counts),
            offsets.repeat_interleave(counts),
            torch.arange(len(plan.counts), device=device).repeat_interleave(counts),
        ]
    )
