"""Layer 3: how payloads cross ranks (torch.distributed, or K simulated in-process workers)."""

from lightning_gmc.transport.base import CommStats, Route, choose_route, decode_mean, ring_allreduce_bytes
from lightning_gmc.transport.distributed import DistributedTransport
from lightning_gmc.transport.simulated import SimulatedTransport

__all__ = [
    "CommStats",
    "DistributedTransport",
    "Route",
    "SimulatedTransport",
    "choose_route",
    "decode_mean",
    "ring_allreduce_bytes",
]
