"""What one setting puts on the wire per step, from the library's own plans and byte formulas.

Every number here comes from the code that runs: each DDP bucket's compressor plan
(:meth:`~lightning_gmc.compressors.Compressor.plan`, which allocates nothing model-sized: plans are
tuples of per-segment counts, and their workspaces stay empty until a compression runs), the route the
exchange would take (:func:`~lightning_gmc.transport.routing.choose_route`), the bytes it hands to the
collective (:func:`~lightning_gmc.transport.routing.handed_nbytes`) and the ring formulas the traffic
counters use (:func:`~lightning_gmc.transport.routing.wire_bytes`). The byte tests check the result
against what the simulator's exchange counts, route by route.

Two layouts:

* ``flat``: every rank is a worker, ``K = N * G``.
* ``node``: the sharded 2-D reducer (``docs/algorithms.md`` 3.11): inside each node a reduce-scatter
  and an all-gather of the direction (:func:`~lightning_gmc.transport.routing.two_level_intra_bytes`),
  between nodes each local rank runs the method on its shard with ``K = N``. The shard of a bucket is
  modelled as ``1/G`` of every parameter (the reducer keeps small parameters whole, which changes the
  selected count by at most one coordinate per small parameter).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lightning_gmc.compressors import (
    CompressionPlan,
    Compressor,
    Identity,
    ScaledCompressor,
    SparseCompressor,
    segments_from_numels,
)
from lightning_gmc.compressors.sparse import SparsePlan
from lightning_gmc.config import GMCConfig, Hierarchy
from lightning_gmc.transport.routing import (
    Route,
    broadcast_bytes,
    choose_route,
    handed_nbytes,
    ring_allreduce_bytes,
    support_nbytes,
    two_level_intra_bytes,
    wire_bytes,
)

__all__ = ["Arm", "Traffic", "arm_traffic", "ddp_buckets", "predicted_broadcast_bits", "takes_density"]

#: DDP's first bucket cap (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``)
_FIRST_BUCKET_BYTES = 1024 * 1024
_BASELINES = {"ddp": "fp32", "ddp_bf16": "bf16"}


@dataclass(frozen=True)
class Arm:
    """One setting whose step the cost model predicts.

    Attributes:
        method: a method name (``"gmc"``, ``"ef"``, ...), or ``"ddp"`` (DDP's own all-reduce) or
            ``"ddp_bf16"`` (DDP with torch's ``bf16_compress_hook``).
        compressor: compressor name (``"none"`` for the dense route of a method).
        density: the compressor's density (ignored by compressors without one).
        detach: GMC+'s detach coefficient (0: GMC).
        hierarchy: ``"flat"`` or ``"node"``.
        wire_dtype: the dtype compressed values travel in.
    """

    method: str
    compressor: str = "none"
    density: float = 1.0
    detach: float = 0.0
    hierarchy: Hierarchy = "flat"
    wire_dtype: str = "fp32"

    @property
    def is_baseline(self) -> bool:
        """DDP itself (with or without the bf16 hook), not a method of this library."""
        return self.method in _BASELINES

    @property
    def has_density(self) -> bool:
        """The compressor takes a density (sparsifiers; not quantizers or the identity)."""
        return takes_density(self.build_compressor())

    def build_compressor(self) -> Compressor:
        """The compressor exactly as a run of this arm builds it (error-feedback scaling included)."""
        if self.is_baseline:
            return Identity(wire_dtype=_BASELINES[self.method])
        detach = self.detach if self.detach else None
        config = GMCConfig(
            method=self.method,
            compressor=self.compressor,
            density=self.density,
            detach=detach,
            wire_dtype=self.wire_dtype,  # type: ignore[arg-type]
        )
        return config.build().compressor

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``GMC+ rbgs 1% node``."""
        if self.method == "ddp":
            return "DDP"
        if self.method == "ddp_bf16":
            return "DDP + bf16 hook"
        name = {"gmc": "GMC+" if self.detach else "GMC", "ef": "EF"}.get(self.method, self.method)
        what = self.compressor
        if self.compressor != "none" and self.has_density:
            what += f" {self.density * 100:g}%"
        if self.wire_dtype != "fp32":
            what += f" {self.wire_dtype}"
        return f"{name} {what}" + (" node" if self.hierarchy == "node" else "")


@dataclass
class Traffic:
    """One step of one arm, as one rank sees it.

    Attributes:
        bytes_sent: bytes this rank puts on the wire (the ``gmc/bytes_sent`` metric; under
            ``hierarchy="node"`` the inter- plus the intra-node part).
        inter_node_bytes: bytes one node sends to other nodes (its ranks together); 0 on one node.
        intra_bytes: bytes one rank sends inside its node under ``hierarchy="node"``.
        dense_bytes: the ring all-reduce of the fp32 gradient over all ranks (DDP's bytes).
        collectives: collectives per step by kind (``allreduce``, ``allgather``, ``broadcast``)
            between workers of the method; ``intra_collectives``: inside the node.
        numel, nnz: elements of the model and coordinates sent per worker (summed over shards).
        rcc: the GMC paper's relative communication cost of the step (eq. 9); an upper bound for
            all-gathered sparse payloads, whose union of supports depends on the data (``rcc_exact``
            False).
        routes: the route of every message.
        workers: K, the workers the method sees.
    """

    bytes_sent: float = 0.0
    inter_node_bytes: float = 0.0
    intra_bytes: float = 0.0
    dense_bytes: float = 0.0
    collectives: dict[str, int] = field(
        default_factory=lambda: {"allreduce": 0, "allgather": 0, "broadcast": 0}
    )
    intra_collectives: int = 0
    numel: int = 0
    nnz: int = 0
    rcc_bits: float = 0.0
    rcc_dense_bits: float = 0.0
    rcc_exact: bool = True
    routes: list[Route] = field(default_factory=list)
    workers: int = 1

    @property
    def rcc(self) -> float:
        return self.rcc_bits / self.rcc_dense_bits if self.rcc_dense_bits else 0.0


def takes_density(compressor: Compressor) -> bool:
    """True for compressors with a ``density`` option (the sparsifiers)."""
    if not dataclasses.is_dataclass(compressor):
        return False
    return any(f.name == "density" for f in dataclasses.fields(compressor))


def ddp_buckets(numels: Sequence[int], bucket_cap_mb: float = 25.0, element_size: int = 4) -> list[list[int]]:
    """Parameter indices of each DDP bucket, as DDP assigns them: parameters in reverse order, the first
    bucket capped at 1 MiB and the others at ``bucket_cap_mb`` (``dist._compute_bucket_assignment_by_size``
    on meta tensors, so nothing is allocated)."""
    cap = int(bucket_cap_mb * 1024 * 1024)
    order = list(range(len(numels)))[::-1]
    dtype = torch.float32 if element_size == 4 else torch.bfloat16
    tensors = [torch.empty(numels[i], device="meta", dtype=dtype) for i in order]
    groups, _ = dist._compute_bucket_assignment_by_size(tensors, [_FIRST_BUCKET_BYTES, cap])
    return [[order[i] for i in group] for group in groups]


def predicted_broadcast_bits(
    compressor: Compressor, plan: CompressionPlan, workers: int
) -> tuple[float, bool]:
    """Bits a parameter server would send back for the sum of ``workers`` payloads (the RCC numerator's
    downlink, ``Compressor.broadcast_bits``), and whether that is exact. All-gathered sparse payloads
    count the union of the supports, bounded here by disjoint supports: ``min(K k, n)`` per segment."""
    if isinstance(compressor, ScaledCompressor):
        inner_plan = plan.inner  # type: ignore[attr-defined]
        return predicted_broadcast_bits(compressor.inner, inner_plan, workers)
    value_bits = 8 * compressor.value_dtype.itemsize
    if isinstance(compressor, Identity):
        return float(value_bits * plan.numel), True
    if isinstance(compressor, SparseCompressor):
        assert isinstance(plan, SparsePlan)
        if compressor.shared_support:
            return float(value_bits * plan.total), True
        union = sum(min(workers * k, seg.numel) for seg, k in zip(plan.segments, plan.counts, strict=True))
        return float((value_bits + 32) * union), workers == 1
    return 32.0 * plan.numel, True  # the base class's dense fp32 downlink


def _add_message(traffic: Traffic, compressor: Compressor, plan: CompressionPlan, workers: int) -> float:
    """Count one message of ``workers`` workers into ``traffic``; return its wire bytes per worker."""
    route = choose_route(compressor, plan, workers)
    traffic.routes.append(route)
    sent = wire_bytes(route, handed_nbytes(compressor, plan, route), workers)
    support = support_nbytes(compressor, plan) if workers > 1 else 0
    if support:
        sent += broadcast_bytes(support, workers)
        traffic.collectives["broadcast"] += 1
        traffic.rcc_bits += 2 * 8.0 * support
    if route != "local":
        traffic.collectives["allgather" if route == "allgather" else "allreduce"] += 1
    traffic.nnz += compressor.nnz(plan)
    down, exact = predicted_broadcast_bits(compressor, plan, workers)
    if route == "dense" and not isinstance(compressor, SparseCompressor):
        down, exact = float(8 * compressor.value_dtype.itemsize * plan.numel), True
    traffic.rcc_bits += workers * compressor.payload_bits(plan) + down
    traffic.rcc_dense_bits += (workers + 1) * 32.0 * plan.numel
    traffic.rcc_exact = traffic.rcc_exact and exact
    return sent


def _shard_numels(numels: Sequence[int], ranks_per_node: int) -> list[int]:
    """One local rank's piece of every parameter (the largest piece: ``ceil(n / G)``)."""
    return [math.ceil(n / ranks_per_node) for n in numels]


def arm_traffic(
    arm: Arm,
    numels: Sequence[int],
    buckets: Sequence[Sequence[int]] | None = None,
    nodes: int = 1,
    ranks_per_node: int = 1,
    compressor: Compressor | None = None,
) -> Traffic:
    """Bytes, collectives and RCC of one step of ``arm`` for a model with these parameter sizes.

    Args:
        arm: the setting.
        numels: elements of every trainable parameter, in the model's order.
        buckets: parameter indices per DDP bucket (:func:`ddp_buckets`); None: one bucket.
        nodes, ranks_per_node: N and G.
        compressor: the compressor instance to plan with (None: :meth:`Arm.build_compressor`).
    """
    if buckets is None:
        buckets = [list(range(len(numels)))]
    if compressor is None:
        compressor = arm.build_compressor()
    hierarchical = arm.hierarchy == "node" and nodes > 1 and ranks_per_node > 1
    world = nodes * ranks_per_node
    workers = nodes if hierarchical else world
    traffic = Traffic(workers=workers)
    for bucket in buckets:
        sizes = [int(numels[i]) for i in bucket]
        bucket_numel = sum(sizes)
        traffic.numel += bucket_numel
        traffic.dense_bytes += ring_allreduce_bytes(4 * bucket_numel, world)
        if not hierarchical:
            plan = compressor.plan(segments_from_numels(sizes, bucket))
            sent = _add_message(traffic, compressor, plan, workers)
            traffic.bytes_sent += sent
            traffic.inter_node_bytes += sent if nodes > 1 else 0.0
            continue
        shard = _shard_numels(sizes, ranks_per_node)
        plan = compressor.plan(segments_from_numels(shard, bucket))
        before = (traffic.rcc_bits, traffic.rcc_dense_bits, traffic.nnz)
        inter = _add_message(traffic, compressor, plan, workers)
        # every local rank runs its shard's message: the node's traffic and the model's counts are G times
        traffic.rcc_bits = before[0] + ranks_per_node * (traffic.rcc_bits - before[0])
        traffic.rcc_dense_bits = before[1] + ranks_per_node * (traffic.rcc_dense_bits - before[1])
        traffic.nnz = before[2] + ranks_per_node * (traffic.nnz - before[2])
        intra = two_level_intra_bytes(sum(shard), ranks_per_node, shift=arm.detach > 0)
        traffic.intra_bytes += intra
        traffic.intra_collectives += 3 if arm.detach > 0 else 2
        traffic.inter_node_bytes += ranks_per_node * inter
        traffic.bytes_sent += inter + intra
    return traffic
