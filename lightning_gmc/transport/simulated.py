"""An in-process transport for K virtual workers.

It computes exactly what :class:`~lightning_gmc.transport.distributed.DistributedTransport` computes:
the same route per message, values summed in rank order for shared supports, payloads decoded in
rank order otherwise, and the same traffic accounting (as seen by one rank).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_gmc.compressors import Payload
from lightning_gmc.methods import BucketState, Message
from lightning_gmc.transport.base import CommStats, choose_route, decode_mean, nonzero_bits

__all__ = ["SimulatedTransport"]


class SimulatedTransport:
    """Exchange messages between K in-process workers.

    Args:
        world_size: number of virtual workers K.
        stats: counters (recorded once per exchange, as rank 0 would see them).
    """

    def __init__(self, world_size: int, stats: CommStats) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.stats = stats

    def exchange(self, messages_per_worker: Sequence[Sequence[Message]], bucket: BucketState) -> list[Tensor]:
        """Return, for each message slot, the mean over workers of the decoded messages.

        ``messages_per_worker[k][i]`` is worker k's i-th message; every worker must send the same
        number of messages with the same compressors. The returned tensors are workspaces of
        ``bucket`` and are overwritten by the next exchange.
        """
        world = self.world_size
        if len(messages_per_worker) != world:
            raise ValueError(f"expected messages from {world} workers, got {len(messages_per_worker)}")
        means = []
        for index, first in enumerate(messages_per_worker[0]):
            compressor, plan = first.compressor, first.plan
            payloads = [worker[index].payload for worker in messages_per_worker]
            mean = bucket.workspace(f"mean{index}", plan.numel)
            route = choose_route(compressor, plan, world)
            upload_bits = compressor.payload_bits(plan)
            nnz = compressor.nnz(plan)
            if route == "allreduce":
                values = payloads[0].tensors["values"].clone()
                for payload in payloads[1:]:
                    values.add_(payload.tensors["values"])
                self.stats.record_message(
                    route, world, values.numel() * values.element_size(), nnz, upload_bits
                )
                summed = Payload({"values": values}, payloads[0].context)
                compressor.decode_summed(summed, plan, mean, world)
                self.stats.record_broadcast(compressor.broadcast_bits([summed], plan))
            else:
                decode_mean(compressor, plan, payloads, mean)
                handed = mean.numel() * mean.element_size() if route == "dense" else plan.payload_nbytes
                self.stats.record_message(route, world, handed, nnz, upload_bits)
                if route == "dense":
                    self.stats.record_broadcast(nonzero_bits(compressor, mean))
                else:
                    self.stats.record_broadcast(compressor.broadcast_bits(payloads, plan))
            means.append(mean)
        return means
