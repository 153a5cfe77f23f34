"""What a route works on (:class:`Column`, one message slot across the local workers) and hands back
(:class:`Launched`, its collectives in flight and the decoding that follows them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.futures import Future

from lightning_gmc.methods import BucketState, Message
from lightning_gmc.transport.collectives import Collectives
from lightning_gmc.transport.routing import Route, SumOrder, sums_in_rank_order
from lightning_gmc.transport.stats import CommStats

__all__ = ["Column", "Launched", "RouteLauncher"]


@dataclass
class Column:
    """One message slot of a bucket across this process's local workers.

    Attributes:
        index: the slot (a method's ``i``-th message of the step).
        messages: each local worker's message in this slot (same compressor and plan on every worker).
        buckets: each local worker's state of the bucket (owns the exchange's workspaces).
        collectives: the back-end.
        stats: where the traffic is counted.
        step: the optimizer step.
        where: the bucket, step and rank, as errors name them.
        fp32_order: how a summing route adds fp32 values; None: by the vector's density
            (``routing.sums_in_rank_order``).
    """

    index: int
    messages: Sequence[Message]
    buckets: Sequence[BucketState]
    collectives: Collectives
    stats: CommStats
    step: int
    where: str
    fp32_order: SumOrder | None = None

    @property
    def world(self) -> int:
        return self.collectives.world_size

    def mean_buffer(self, worker: int) -> Tensor:
        """Where local worker ``worker``'s mean goes: its message's ``decode_into``, or a workspace."""
        message = self.messages[worker]
        if message.decode_into is not None:
            return message.decode_into
        return self.buckets[worker].workspace(f"mean{self.index}", message.plan.numel)

    def in_rank_order(self, dtype: torch.dtype, sparse: bool) -> bool:
        """Whether a summing route adds values of ``dtype`` in rank order (two phases) here;
        ``sparse``: the summed vector is a sparse support's values, not a dense vector."""
        return sums_in_rank_order(dtype, self.world, self.fp32_order, sparse)

    def record(self, route: Route, handed_bytes: int, in_rank_order: bool = False) -> None:
        """Count the message: ``handed_bytes`` to its collective (to the reduce-scatter of a sum in rank
        order, padded), its upload bits and nonzeros."""
        first = self.messages[0]
        upload_bits = first.compressor.payload_bits(first.plan)
        nnz = first.compressor.nnz(first.plan)
        if in_rank_order:
            self.stats.record_rank_ordered_sum(route, self.world, handed_bytes, nnz, upload_bits, self.step)
        else:
            self.stats.record_message(route, self.world, handed_bytes, nnz, upload_bits, self.step)


@dataclass
class Launched:
    """One message's collectives in flight and the local decoding that follows them.

    Attributes:
        column: the message slot.
        collective: the collective named in errors.
        futures: the collectives still in flight (none for a local route).
        finish: decodes local worker 0's mean once every future has completed, and returns it.
    """

    column: Column
    collective: str
    futures: list[Future[Tensor]]
    finish: Callable[[], Tensor]


class RouteLauncher(Protocol):
    """How one route sends a message slot."""

    def launch(self, column: Column) -> Launched:
        """Issue the slot's collectives now and return what is in flight (module docstring)."""
        ...
