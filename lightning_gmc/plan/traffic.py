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
* ``node``: the sharded 2-D reducer (``docs/algorithms.md`` 3.11), on the reducer's own shard plan
  (:func:`~lightning_gmc.methods.shards.plan_shards`): per bucket, inside each node a reduce-scatter
  and an all-gather of the direction padded to the bucket's largest shard, with one status element
  (:func:`~lightning_gmc.transport.routing.two_level_intra_bytes`), and between nodes each local rank's
  message planned on its own pieces (each piece a compressor segment) with ``K = N``; methods with a
  detached point add the residual's all-gather once per step
  (:func:`~lightning_gmc.transport.routing.residual_gather_bytes`). The byte tests check it against
  what :class:`~lightning_gmc.HierarchicalSimulator` counts.
"""

from __future__ import annotations

import dataclasses
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
from lightning_gmc.methods import GroupHyper, Method, ParameterTable
from lightning_gmc.methods.shards import DEFAULT_MIN_PIECE, BucketShards, ShardPlan, plan_shards
from lightning_gmc.transport.routing import (
    Route,
    broadcast_bytes,
    choose_route,
    handed_nbytes,
    ordered_sum_chunk,
    residual_gather_bytes,
    ring_allreduce_bytes,
    sums_in_rank_order,
    support_nbytes,
    two_level_intra_bytes,
    wire_bytes,
)

__all__ = ["Arm", "Traffic", "arm_traffic", "ddp_buckets", "predicted_broadcast_bits", "takes_density"]

#: DDP's first bucket cap (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``)
_FIRST_BUCKET_BYTES = 1024 * 1024
_BASELINES = {"ddp": "fp32", "ddp_bf16": "bf16"}
#: a step's hyper-parameters with a positive learning rate (whether a detached point is used)
_SOME_HYPER = GroupHyper(lr=0.1, prev_lr=0.1, momentum=0.9, weight_decay=0.0)


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

    def build_method(self) -> Method:
        """The method exactly as a run of this arm builds it (not for the DDP baselines)."""
        detach = self.detach if self.detach else None
        config = GMCConfig(
            method=self.method,
            compressor=self.compressor,
            density=self.density,
            detach=detach,
            wire_dtype=self.wire_dtype,  # type: ignore[arg-type]
        )
        return config.build()

    def build_compressor(self) -> Compressor:
        """The compressor exactly as a run of this arm builds it (error-feedback scaling included)."""
        if self.is_baseline:
            return Identity(wire_dtype=_BASELINES[self.method])
        return self.build_method().compressor

    @property
    def gathers_residual(self) -> bool:
        """Under ``hierarchy="node"``, every step all-gathers the residual inside the node: the method
        evaluates its gradient at a detached point ``w - s * residual`` (GMC+, DEF-A,
        ``ef_server_momentum`` with ``detach > 0``), as the hook decides it at a positive learning rate."""
        if self.is_baseline:
            return False
        method = self.build_method()
        return bool(method.detach_scale(_SOME_HYPER)) and "residual" in method.buffers

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
            ``hierarchy="node"`` a rank's intra-node bytes plus its node's inter-node bytes divided by
            G: the mean over the node's ranks, whose shards, hence messages, differ).
        inter_node_bytes: bytes one node sends to other nodes (its ranks together); 0 on one node.
        rank_inter_bytes: under ``hierarchy="node"``, the inter-node bytes of each local rank (its
            exchanges over its own pieces; their sum is ``inter_node_bytes``); empty otherwise.
        intra_bytes: bytes one rank sends inside its node under ``hierarchy="node"`` (every rank of
            the node sends the same: chunks are padded to the bucket's largest shard).
        dense_bytes: the ring all-reduce of the fp32 gradient over all ranks (DDP's bytes).
        collectives: collectives per step by kind (``allreduce``, ``reduce_scatter``, ``allgather``,
            ``broadcast``; a sum in rank order is a reduce-scatter and an all-gather) between workers of
            the method (under ``hierarchy="node"``, per bucket the most any local
            rank runs: the G ranks' exchanges run side by side); ``intra_collectives``: inside the node.
        numel, nnz: elements of the model and coordinates sent per worker (summed over shards).
        rcc: the GMC paper's relative communication cost of the step (eq. 9); an upper bound for
            all-gathered sparse payloads, whose union of supports depends on the data (``rcc_exact``
            False).
        routes: the route of every message.
        workers: K, the workers the method sees.
        buckets: DDP buckets per step (the hook runs once per bucket).
    """

    bytes_sent: float = 0.0
    inter_node_bytes: float = 0.0
    rank_inter_bytes: list[float] = field(default_factory=list)
    intra_bytes: float = 0.0
    dense_bytes: float = 0.0
    collectives: dict[str, int] = field(
        default_factory=lambda: {"allreduce": 0, "reduce_scatter": 0, "allgather": 0, "broadcast": 0}
    )
    intra_collectives: int = 0
    numel: int = 0
    nnz: int = 0
    rcc_bits: float = 0.0
    rcc_dense_bits: float = 0.0
    rcc_exact: bool = True
    routes: list[Route] = field(default_factory=list)
    workers: int = 1
    buckets: int = 0

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


def _sums_in_rank_order(compressor: Compressor, route: Route, workers: int) -> bool:
    """Whether the exchange sums this message in rank order (default ``fp32_order``, outside
    deterministic mode: :func:`~lightning_gmc.transport.routing.sums_in_rank_order`)."""
    if route == "allreduce":
        return sums_in_rank_order(compressor.value_dtype, workers, None, sparse=compressor.sparse)
    if route == "dense":
        return sums_in_rank_order(compressor.value_dtype, workers, None, sparse=False)
    return False


def _summed_counts(compressor: Compressor, plan: CompressionPlan, route: Route) -> tuple[int, ...]:
    """Elements per segment of the vector a summing route adds: the shared support's values, or the
    dense bucket."""
    if route == "allreduce":
        return compressor.value_counts(plan)
    return tuple(seg.numel for seg in plan.segments)


def _add_message(
    traffic: Traffic, compressor: Compressor, plan: CompressionPlan, workers: int, ring: bool = False
) -> float:
    """Count one message of ``workers`` workers into ``traffic``; return its wire bytes per worker.
    ``ring``: summed by one all-reduce whatever its dtype (DDP's own hooks)."""
    route = choose_route(compressor, plan, workers)
    traffic.routes.append(route)
    ordered = not ring and _sums_in_rank_order(compressor, route, workers)
    if ordered:  # a reduce-scatter of K padded chunks, then an all-gather of one
        dtype = compressor.value_dtype
        counts = _summed_counts(compressor, plan, route)
        owner_counts = None  # fp32: contiguous chunks; 16-bit: laid out by owner
        if dtype != torch.float32:
            owner_counts = [(seg.param_index, n) for seg, n in zip(plan.segments, counts, strict=True)]
        padded = workers * ordered_sum_chunk(sum(counts), workers, owner_counts) * dtype.itemsize
        sent = ring_allreduce_bytes(padded, workers)
        traffic.collectives["reduce_scatter"] += 1
        traffic.collectives["allgather"] += 1
    else:
        sent = wire_bytes(route, handed_nbytes(compressor, plan, route), workers)
    support = support_nbytes(compressor, plan) if workers > 1 else 0
    if support:
        sent += broadcast_bytes(support, workers)
        traffic.collectives["broadcast"] += 1
        traffic.rcc_bits += 2 * 8.0 * support
    if route != "local" and not ordered:
        traffic.collectives["allgather" if route == "allgather" else "allreduce"] += 1
    traffic.nnz += compressor.nnz(plan)
    down, exact = predicted_broadcast_bits(compressor, plan, workers)
    if route == "dense" and not isinstance(compressor, SparseCompressor):
        down, exact = float(8 * compressor.value_dtype.itemsize * plan.numel), True
    traffic.rcc_bits += workers * compressor.payload_bits(plan) + down
    traffic.rcc_dense_bits += (workers + 1) * 32.0 * plan.numel
    traffic.rcc_exact = traffic.rcc_exact and exact
    return sent


def _table(numels: Sequence[int]) -> ParameterTable:
    """A table of parameters of these sizes (the shard plan reads sizes and order only)."""
    names = tuple(f"p{i}" for i in range(len(numels)))
    return ParameterTable(names, tuple(torch.Size([int(n)]) for n in numels), (0,) * len(numels))


def _add_node_bucket(
    traffic: Traffic, compressor: Compressor, shard_plan: ShardPlan, shards: BucketShards, nodes: int
) -> None:
    """Count one bucket under ``hierarchy="node"``: each local rank's message over its own pieces
    (a rank without a piece of the bucket exchanges nothing, as the reducer), the intra-node phases."""
    before = dict(traffic.collectives)
    most = dict.fromkeys(before, 0)
    for rank, piece_ids in enumerate(shards.shard_pieces):
        if not piece_ids:
            continue
        pieces = [shard_plan.pieces[i] for i in piece_ids]
        plan = compressor.plan(segments_from_numels([p.numel for p in pieces], [p.key for p in pieces]))
        sent = _add_message(traffic, compressor, plan, nodes)
        traffic.rank_inter_bytes[rank] += sent
        traffic.inter_node_bytes += sent
        for kind in most:
            most[kind] = max(most[kind], traffic.collectives[kind] - before[kind])
            traffic.collectives[kind] = before[kind]
    for kind in most:
        traffic.collectives[kind] += most[kind]
    traffic.intra_bytes += two_level_intra_bytes(shards.chunk, shard_plan.ranks_per_node)
    traffic.intra_collectives += 2


def arm_traffic(
    arm: Arm,
    numels: Sequence[int],
    buckets: Sequence[Sequence[int]] | None = None,
    nodes: int = 1,
    ranks_per_node: int = 1,
    compressor: Compressor | None = None,
    min_piece: int = DEFAULT_MIN_PIECE,
) -> Traffic:
    """Bytes, collectives and RCC of one step of ``arm`` for a model with these parameter sizes.

    Args:
        arm: the setting.
        numels: elements of every trainable parameter, in the model's order.
        buckets: parameter indices per DDP bucket (:func:`ddp_buckets`); None: one bucket.
        nodes, ranks_per_node: N and G.
        compressor: the compressor instance to plan with (None: :meth:`Arm.build_compressor`).
        min_piece: under ``hierarchy="node"``, the shard plan's smallest piece
            (``GMCHookState.set_node_groups``; :func:`~lightning_gmc.methods.shards.plan_shards`).
    """
    if buckets is None:
        buckets = [list(range(len(numels)))]
    if compressor is None:
        compressor = arm.build_compressor()
    hierarchical = arm.hierarchy == "node" and nodes > 1 and ranks_per_node > 1
    world = nodes * ranks_per_node
    workers = nodes if hierarchical else world
    traffic = Traffic(workers=workers, buckets=len(buckets))
    for bucket in buckets:
        bucket_numel = sum(int(numels[i]) for i in bucket)
        traffic.numel += bucket_numel
        traffic.dense_bytes += ring_allreduce_bytes(4 * bucket_numel, world)
    if hierarchical:
        shard_plan = plan_shards(_table(numels), ranks_per_node, min_piece)
        traffic.rank_inter_bytes = [0.0] * ranks_per_node
        for bucket in buckets:
            _add_node_bucket(traffic, compressor, shard_plan, shard_plan.bucket(bucket), nodes)
        if arm.gathers_residual:
            traffic.intra_bytes += residual_gather_bytes(shard_plan.largest_share, ranks_per_node)
            traffic.intra_collectives += 1
        traffic.bytes_sent = traffic.inter_node_bytes / ranks_per_node + traffic.intra_bytes
        return traffic
    for bucket in buckets:
        sizes = [int(numels[i]) for i in bucket]
        plan = compressor.plan(segments_from_numels(sizes, bucket))
        sent = _add_message(traffic, compressor, plan, workers, ring=arm.is_baseline)
        traffic.bytes_sent += sent
        traffic.inter_node_bytes += sent if nodes > 1 else 0.0
    return traffic
