"""Layer 3: how messages cross workers.

One :class:`Exchange` (routing, dense fallback, payload packing, traffic accounting) runs over a
small collective protocol, :class:`Collectives`, with two back-ends: :class:`TorchCollectives` (any
torch.distributed process group; the DDP hook) and :class:`InProcessCollectives` (K virtual workers
in one process; the simulator).
"""

from lightning_gmc.transport.collectives import Collectives, InProcessCollectives, TorchCollectives
from lightning_gmc.transport.exchange import CollectiveFailure, Exchange, WireOverflow
from lightning_gmc.transport.routing import (
    Route,
    SumOrder,
    all_gather_bytes,
    broadcast_bytes,
    check_sum_order,
    choose_route,
    decode_mean,
    handed_nbytes,
    ordered_sum_chunk,
    residual_gather_bytes,
    ring_allreduce_bytes,
    sums_in_rank_order,
    support_nbytes,
    two_level_intra_bytes,
    wire_bytes,
)
from lightning_gmc.transport.stats import CommStats
from lightning_gmc.transport.support import LeaderSupport, leader_of

__all__ = [
    "CollectiveFailure",
    "Collectives",
    "CommStats",
    "Exchange",
    "InProcessCollectives",
    "LeaderSupport",
    "Route",
    "SumOrder",
    "TorchCollectives",
    "WireOverflow",
    "all_gather_bytes",
    "broadcast_bytes",
    "check_sum_order",
    "choose_route",
    "decode_mean",
    "handed_nbytes",
    "leader_of",
    "ordered_sum_chunk",
    "residual_gather_bytes",
    "ring_allreduce_bytes",
    "sums_in_rank_order",
    "support_nbytes",
    "two_level_intra_bytes",
    "wire_bytes",
]
