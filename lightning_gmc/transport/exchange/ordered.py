"""The rank-ordered sum of the summing routes: reduce-scatter in fp32, one rounding per element by its
owner, all-gather.

A ring all-reduce adds each chunk in the order the ring visits the ranks, which differs per chunk, with
the number of workers and with DDP's bucket layout; with 16-bit inputs it also rounds at every hop. The
exchange's summing routes (a shared support's ``values``, the dense route's vectors) can instead sum
in two phases:

1. the vector is cut into ``K`` chunks, and
   :meth:`~lightning_gmc.transport.collectives.Collectives.reduce_scatter_sum` gives worker ``r`` the
   sums ``S`` of chunk ``r``'s elements, added in rank order in fp32;
2. with 16-bit inputs worker ``r`` rounds ``S`` to the wire dtype once and keeps what the rounding did
   not deliver, ``S - round(S)`` (exact in fp32); the (rounded) chunks are all-gathered, so every
   worker decodes the same sum.

Every element is therefore added in fp32 in rank order (and rounded once): its bits do not depend on
the chunking, K's ring or the bucket layout, and equal the simulator's. fp32 vectors are cut into
contiguous chunks (padded with at most ``K - 1`` zeros). A 16-bit vector's remainders must not depend
on the layout either, so its chunks follow **owners** fixed per parameter element: element ``j`` of
parameter ``p`` (``p`` its index in the model, ``j`` its position among that parameter's summed values)
belongs to worker ``(p + j) mod K``; the vector is laid out owner by owner (each share padded to the
longest, a few elements per parameter of the bucket at most), which costs a gather before and a scatter
after the collectives. On the wire both are a ring all-reduce's ``2 (K-1)/K`` of the padded vector. The
reduce-scatter is waited for in the caller's thread before the all-gather is issued (the rounding sits
between them), so a bucket's communication overlaps less with the backward pass than one all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.futures import Future

from lightning_gmc.compressors import CompressionPlan, Segment
from lightning_gmc.transport.exchange.column import Column
from lightning_gmc.transport.exchange.failures import wait_or_fail
from lightning_gmc.transport.routing import ordered_sum_chunk

__all__ = ["OrderedSum", "Ownership", "ownership", "ownership_of", "start_ordered_sum"]


@dataclass(frozen=True)
class Ownership:
    """Who sums each element of a vector laid out segment after segment (module docstring).

    Attributes:
        chunk: elements per worker's chunk of the owner-major layout (the longest share).
        slots: int64, for every element of the vector, its position in the ``K * chunk`` layout.
        owned: per worker, int64 positions (in the vector) of the elements it owns, in chunk order.
    """

    chunk: int
    slots: Tensor
    owned: tuple[Tensor, ...]


def ownership_of(
    plan: CompressionPlan, counts: Sequence[int], world_size: int, device: torch.device
) -> Ownership:
    """The owners of a vector holding ``counts[i]`` elements of the plan's segment ``i``, built once per
    plan, K and device (a plan's constant)."""
    return plan.workspace.constant(
        f"owners{world_size}", device, lambda: ownership(plan.segments, counts, world_size, device)
    )


def ownership(
    segments: Sequence[Segment], counts: Sequence[int], world_size: int, device: torch.device
) -> Ownership:
    """The owners of a vector holding ``counts[i]`` elements of segment ``i``'s parameter, in order."""
    owners = torch.cat(
        [
            torch.arange(count, dtype=torch.int64).add_(segment.param_index).remainder_(world_size)
            for segment, count in zip(segments, counts, strict=True)
        ]
    )
    order = torch.sort(owners, stable=True).indices  # positions grouped by owner, in vector order
    shares = torch.bincount(owners, minlength=world_size)
    # The planner pads with the same formula (routing.ordered_sum_chunk): one source for the bytes.
    owner_counts = [(segment.param_index, count) for segment, count in zip(segments, counts, strict=True)]
    chunk = ordered_sum_chunk(owners.numel(), world_size, owner_counts)
    starts = torch.cumsum(shares, 0) - shares
    grouped = owners[order]
    rank_in_chunk = torch.arange(owners.numel(), dtype=torch.int64) - starts[grouped]
    slots = torch.empty_like(order)
    slots[order] = grouped * chunk + rank_in_chunk
    owned = tuple(order[int(a) : int(a) + int(n)].to(device) for a, n in zip(starts, shares, strict=True))
    return Ownership(chunk, slots.to(device), owned)


@dataclass
class OrderedSum:
    """A rank-ordered sum whose all-gather is in flight.

    Attributes:
        future: the all-gather of the rounded chunks.
        gathered: the rounded sums in the owner-major layout (``K * chunk`` elements of the inputs'
            dtype) once ``future`` completes; :meth:`result` puts them back in the vector's order.
        owners: who owns what; None for fp32 inputs, which are cut into ``K`` contiguous chunks (nothing
            is rounded, so who adds an element does not change its bits, and no permutation is paid).
        numel: elements of the summed vector.
        remainders: per local worker, ``S - round(S)`` of the elements it owns, in chunk order (fp32),
            or None when the inputs are fp32 (nothing is rounded).
        padded_bytes: bytes of one worker's owner-major input (what the reduce-scatter is handed).
    """

    future: Future[Tensor]
    gathered: Tensor
    owners: Ownership | None
    numel: int
    remainders: list[Tensor] | None
    padded_bytes: int

    def result(self, out: Tensor) -> Tensor:
        """The rounded sum in the vector's order, written into ``out`` (of the inputs' dtype)."""
        if self.owners is None:
            return out.copy_(self.gathered[: self.numel])
        return torch.index_select(self.gathered, 0, self.owners.slots, out=out)

    def owned(self, rank: int) -> Tensor:
        """Positions (in the vector) of the elements rank ``rank`` summed and rounded."""
        assert self.owners is not None, "fp32 sums round nothing: no remainders"
        return self.owners.owned[rank]

    def remainder_of(self, worker: int, rank: int, numel: int, out: Tensor) -> Tensor:
        """Local worker ``worker``'s (rank ``rank``'s) remainders in the vector's layout (zero where it
        owns nothing), written into ``out`` (fp32, ``numel`` elements)."""
        assert self.remainders is not None
        owned = self.owned(rank)
        out.zero_()
        return out.index_copy_(0, owned, self.remainders[worker][: owned.numel()])


def start_ordered_sum(column: Column, tensors: Sequence[Tensor], owners: Ownership | None) -> OrderedSum:
    """Sum the local workers' ``tensors`` (one per worker, of one size and dtype) in rank order; waits
    for the reduce-scatter, leaves the all-gather in flight (module docstring). ``owners`` lays 16-bit
    inputs out owner by owner; None cuts fp32 inputs into contiguous chunks."""
    index, world = column.index, column.world
    numel, dtype = tensors[0].numel(), tensors[0].dtype
    if owners is None and dtype != torch.float32:
        raise ValueError("a 16-bit sum needs the owners of its elements (its remainders are kept by them)")
    chunk = ordered_sum_chunk(numel, world) if owners is None else owners.chunk
    padded = chunk * world
    sends = []
    for tensor, bucket in zip(tensors, column.buckets, strict=True):
        if owners is None and padded == numel:
            sends.append(tensor)  # contiguous chunks, no padding: the input itself
            continue
        send = bucket.workspace(f"sum_send{index}", padded, dtype)
        if owners is None:
            send[:numel].copy_(tensor)
            send[numel:].zero_()
        else:
            send.zero_()
            send.index_copy_(0, owners.slots, tensor)
        sends.append(send)
    sums = [bucket.workspace(f"sum_chunk{index}", chunk) for bucket in column.buckets]
    scratch = column.buckets[0].workspace(f"sum_received{index}", padded, dtype)
    what = f"reduce_scatter of message {index}"
    wait_or_fail(column.collectives.reduce_scatter_sum(sends, sums, scratch), what, column.where)
    remainders: list[Tensor] | None = None
    rounded = sums
    if dtype != torch.float32:
        # One rounding per element, by its owner; what the rounding drops stays with the owner.
        rounded = [bucket.workspace(f"sum_rounded{index}", chunk, dtype) for bucket in column.buckets]
        remainders = []
        for total, near, bucket in zip(sums, rounded, column.buckets, strict=True):
            near.copy_(total)  # round to nearest
            remainders.append(torch.sub(total, near, out=bucket.workspace(f"sum_remainder{index}", chunk)))
    gathered = column.buckets[0].workspace(f"sum_gathered{index}", padded, dtype)
    future = column.collectives.all_gather(rounded, gathered)
    return OrderedSum(future, gathered, owners, numel, remainders, padded * tensors[0].element_size())
