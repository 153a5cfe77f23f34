"""The compressor contract: a pure, stateless map ``tensor -> payload -> tensor``.

A compressor works on one flat fp32 vector that is the concatenation of *segments* (one per
parameter). Selection granularity is always the segment, never the whole vector, so the result does
not depend on how DDP happens to group parameters into buckets (DDP rebuilds its buckets after the
first step). Everything a compressor needs that depends only on the segment sizes is computed once,
in :meth:`Compressor.plan`.

Compressors are immutable values: frozen dataclasses whose fields are their whole configuration, so
two compressors with equal options are equal and hash alike, and a variant is made with
``dataclasses.replace``. Callers cache plans by (compressor, layout). Buffers have explicit owners
(:mod:`lightning_gmc.compressors.workspace`): the plan owns call-local scratch, the caller of
:meth:`Compressor.compress` owns the payload's buffers.

Randomness comes from :class:`RandomStreams`, which derives ``torch.Generator`` seeds from
``(seed, step, stream, parameter index, rank)``. Streams marked *shared* give identical draws on every
rank without communication (RBGS, shared-seed random-k); *private* streams differ per rank.

What crosses the wire is a :class:`Payload`: a small ordered set of tensors of fixed size for a given
plan. Its byte size is exactly what the transport hands to the collective, and :meth:`payload_bits`
is the information content the bit accounting (RCC) uses.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from lightning_gmc._arguments import check_int
from lightning_gmc.compressors.workspace import Workspace

__all__ = [
    "Compressor",
    "CompressionPlan",
    "Payload",
    "RandomStreams",
    "Segment",
    "TensorSpec",
    "mix_seed",
    "selected_count",
]

_MASK64 = (1 << 64) - 1


def mix_seed(*words: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 chain); identical on every rank and platform."""
    state = 0x9E3779B97F4A7C15
    for word in words:
        state = (state + (word & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


def selected_count(density: float, numel: int) -> int:
    """Number of coordinates a sparsifier keeps in a segment: ``max(1, floor(density * numel))``.

    The floor with a minimum of one follows the RBGS reference code (``docs/algorithms.md`` 3.6);
    a tiny epsilon keeps ``0.29 * 100`` from flooring to 28.
    """
    return min(numel, max(1, math.floor(density * numel + 1e-9)))


@dataclass(frozen=True)
class Segment:
    """One parameter's slice of a flat vector.

    Attributes:
        offset: start of the slice in the flat vector.
        numel: number of elements.
        param_index: the parameter's position in the model's global parameter order. Randomness is
            keyed by it, so draws do not depend on the bucket layout.
    """

    offset: int
    numel: int
    param_index: int


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and element count of one payload tensor."""

    name: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class CompressionPlan:
    """Per-layout constants of a compressor, computed once by :meth:`Compressor.plan`.

    Subclasses add what their compressor needs (selected counts, group layout, ...). ``workspace``
    holds the compressor's call-local scratch and the device tensors derived lazily from the plan
    (index templates), built once per device and reused every step; nothing in it outlives one call,
    so payloads never point into it.
    """

    segments: tuple[Segment, ...]
    numel: int
    payload: tuple[TensorSpec, ...]
    workspace: Workspace = field(default_factory=Workspace, repr=False, compare=False)

    @property
    def payload_nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.payload)


@dataclass
class Payload:
    """What one rank sends for one flat vector.

    Attributes:
        tensors: the wire tensors, in the order of ``plan.payload``. They belong to the payload (fresh
            tensors or buffers of the workspace the caller passed to :meth:`Compressor.compress`),
            so the transport may reduce them in place.
        context: local-only data the decoder needs and that never crosses the wire, such as the
            indices of a shared-seed support (GRACE's ``ctx``).
    """

    tensors: dict[str, Tensor]
    context: dict[str, Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class RandomStreams:
    """Deterministic random number generators keyed by step, stream, parameter and (optionally) rank.

    Args:
        seed: the run's seed; must be equal on all ranks.
        rank: this worker's rank; only *private* streams use it.
    """

    def __init__(self, seed: int, rank: int) -> None:
        self.seed = check_int("seed", seed)
        self.rank = int(rank)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        gen.manual_seed(seed)
        return gen

    def shared(self, device: torch.device, step: int, stream: str, param_index: int = -1) -> torch.Generator:
        """A generator that yields the same draws on every rank for this (step, stream, parameter)."""
        return self._generator(device, mix_seed(self.seed, step, _stream_id(stream), param_index, -1))

    def private(self, device: torch.device, step: int, stream: str, param_index: int = -1) -> torch.Generator:
        """A generator whose draws differ per rank (dithering, threshold sampling)."""
        return self._generator(device, mix_seed(self.seed, step, _stream_id(stream), param_index, self.rank))

    def salted(self, salt: int) -> RandomStreams:
        """Independent streams for a second compressor used in the same step (salt 0 is ``self``)."""
        return self if salt == 0 else RandomStreams(mix_seed(self.seed, salt), self.rank)


def _stream_id(stream: str) -> int:
    # A stable integer per stream name (Python's hash() is salted per process).
    return mix_seed(*stream.encode())


class Compressor(ABC):
    """Base class of all compressors.

    Subclasses are frozen dataclasses (``@dataclass(frozen=True)``) whose fields are their options,
    validated in ``__post_init__``; they set the class attributes and implement :meth:`plan`,
    :meth:`compress` and :meth:`decompress_add`. Being values, compressors must be hashable: plans
    are cached by (compressor, layout).

    Class attributes:
        name: registry name.
        shared_support: True when every rank's payload has the same layout *and* decoding is linear in
            the payload values, so payloads can be summed by an all-reduce before decoding (identity,
            RBGS, shared-seed random-k, topk_shared). Otherwise payloads travel by all-gather and each
            is decoded.
        leader_support: True when the shared support is chosen by one rank per step and handed to
            every rank before compression (``topk_shared``): the caller supplies it through
            :meth:`propose` and :meth:`compress_on` (``docs/algorithms.md`` 3.13).
        sparse: True when the output has at most ``plan`` selected coordinates per segment and the
            residual ``x - C(x)`` is ``x`` with the selected coordinates zeroed.
        sends_input: True when ``C(x) = x`` and the payload may be ``x`` itself (:meth:`wrap_input`).
        unbiased: True when ``E[C(x)] = x`` (a class attribute, or a field derived from the options
            when it depends on them).
    """

    name: ClassVar[str] = ""
    shared_support: ClassVar[bool] = False
    leader_support: ClassVar[bool] = False
    sparse: ClassVar[bool] = False
    #: ``C(x) = x`` bit for bit and the payload can be ``x`` itself (:meth:`wrap_input`): callers may
    #: build ``x`` in a buffer of their choice and send it without a copy (the identity). Needs
    #: ``shared_support`` and a :meth:`decode_summed` whose ``out`` may be the summed values tensor
    #: itself (the mean is then decoded in place).
    unbiased: bool = False

    @property
    def sends_input(self) -> bool:
        """True when ``C(x) = x`` and the payload may be ``x`` itself (:meth:`wrap_input`); a
        property, so that an option can decide it (the identity in a 16-bit ``wire_dtype`` rounds)."""
        return False

    @abstractmethod
    def plan(self, segments: Sequence[Segment]) -> CompressionPlan:
        """Precompute everything that depends only on the segment sizes."""

    @abstractmethod
    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        """Encode the flat fp32 vector ``x`` (not modified).

        ``workspace`` owns any reusable buffer the payload is written into; the caller keeps it (and
        uses it for no other message) until the payload has been exchanged. ``None`` makes such
        payload tensors fresh allocations.
        """

    @abstractmethod
    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        """Add the decoded vector ``C(x)`` to ``out`` in place."""

    def propose(self, x: Tensor, plan: CompressionPlan) -> Tensor:
        """``leader_support`` compressors: the support (flat int64 indices) the leader picks from ``x``."""
        raise NotImplementedError(f"{self.name} does not choose a support for other ranks (leader_support)")

    def compress_on(
        self, x: Tensor, plan: CompressionPlan, index: Tensor, workspace: Workspace | None = None
    ) -> Payload:
        """``leader_support`` compressors: encode ``x`` on the agreed support ``index``."""
        raise NotImplementedError(f"{self.name} does not compress on a given support (leader_support)")

    def support_numel(self, plan: CompressionPlan) -> int:
        """``leader_support`` compressors: number of indices of an agreed support (sent as int32)."""
        raise NotImplementedError(f"{self.name} has no agreed support (leader_support)")

    def decode_summed(self, summed: Payload, plan: CompressionPlan, out: Tensor, world_size: int) -> Tensor:
        """``out = C(summed) / K`` for a shared-support payload whose ``values`` hold the sum over ranks
        (the all-reduce route). ``summed.tensors`` are the transport's own and may be modified.

        The default is ``out.zero_(); decompress_add; out.div_(K)``; compressors override it with
        fewer passes over ``out`` when they can reproduce exactly the same bits.
        """
        out.zero_()
        self.decompress_add(summed, plan, out)
        return out if world_size == 1 else out.div_(world_size)  # x / 1 == x: one pass fewer

    def wrap_input(self, x: Tensor, plan: CompressionPlan) -> Payload:
        """The payload of ``x`` that *is* ``x`` (no copy), for compressors with :attr:`sends_input`.

        The caller gives ``x`` up until the exchange of this payload has finished: the transport may
        sum into it in place. Compressors without :attr:`sends_input` raise.
        """
        raise TypeError(f"{self.name!r} does not send its input unchanged (sends_input is False)")

    def subtract_own(self, x: Tensor, payload: Payload, plan: CompressionPlan, workspace: Tensor) -> None:
        """Set ``x <- x - C(x)`` for the payload this rank just produced from ``x``.

        The default decodes into ``workspace`` (same size as ``x``) and subtracts; sparse compressors
        override it with an exact zeroing of the selected coordinates.
        """
        workspace.zero_()
        self.decompress_add(payload, plan, workspace)
        x.sub_(workspace)

    def value_counts(self, plan: CompressionPlan) -> tuple[int, ...]:
        """Shared-support compressors: how many of the payload's ``values`` each segment contributes,
        in segment order (the exchange sums ``values`` element-wise and needs to know which
        parameter each element belongs to). The default is every coordinate (the identity)."""
        return tuple(seg.numel for seg in plan.segments)

    def nnz(self, plan: CompressionPlan) -> int:
        """Coordinates one payload carries (``||C(x)||_0``, up to exact zeros); the achieved density
        metric is ``nnz / numel``."""
        return plan.numel

    def payload_bits(self, plan: CompressionPlan) -> int:
        """Information bits of one payload (what the paper-style accounting counts).

        Defaults to the wire size; compressors whose wire format pads (bit packing to whole bytes)
        override it.
        """
        return 8 * plan.payload_nbytes

    def broadcast_bits(self, payloads: Sequence[Payload], plan: CompressionPlan) -> int:
        """Bits a parameter server would send back for ``sum_k C(u_k)`` (the RCC accounting of the
        GMC paper's experiments; ``docs/algorithms.md`` 3.8).

        The default is a dense fp32 vector; sparse and shared-support compressors override it.
        """
        return 32 * plan.numel

    @property
    def value_dtype(self) -> torch.dtype:
        """The dtype this compressor's float values travel in (``wire_dtype``; fp32 unless the
        compressor takes a ``wire_dtype`` option, see :mod:`lightning_gmc.compressors.wire`)."""
        return torch.float32

    def describe(self) -> str:
        """Short human-readable configuration, used in logs and errors."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def segments_from_numels(
    numels: Sequence[int], param_indices: Sequence[int] | None = None
) -> tuple[Segment, ...]:
    """Lay segments of the given sizes back to back (helper for tests and the simulator)."""
    out: list[Segment] = []
    offset = 0
    for i, n in enumerate(numels):
        out.append(Segment(offset, int(n), i if param_indices is None else int(param_indices[i])))
        offset += int(n)
    return tuple(out)
