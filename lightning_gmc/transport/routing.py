"""Which collective carries a message, and the aggregation maths shared by every route.

How a message crosses workers depends only on its compressor and the world size K:

* ``local``: K = 1, nothing to exchange.
* ``allreduce``: the compressor's support is shared and decoding is linear, so the ``values`` tensors
  are summed by one all-reduce and decoded once (identity, RBGS, shared-seed random-k).
* ``allgather``: every worker's payload is packed into one fixed-size byte buffer, all-gathered once,
  and each worker's part is decoded and summed in rank order (top-k, quantizers).
* ``dense``: an all-gather would put more bytes on the wire than a ring all-reduce of the dense
  bucket, ``(K-1) B > 2 (K-1)/K * 4 n`` (for top-k with fp32 values and int32 indices: density
  ``>= 1/K``; ``docs/algorithms.md`` 3.7), so every worker decodes its own payload locally
  and the dense vectors are all-reduced. The maths is unchanged: only the transport differs.

The byte formulas here are the one source of truth for what a message puts on the wire: the traffic
counters (:class:`~lightning_gmc.transport.stats.CommStats`) count with them, and the cost model
(:mod:`lightning_gmc.plan`) predicts with them. Wire bytes follow the ring model, per worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_gmc.compressors import CompressionPlan, Compressor, Payload

__all__ = [
    "Route",
    "SumOrder",
    "all_gather_bytes",
    "broadcast_bytes",
    "check_sum_order",
    "choose_route",
    "decode_mean",
    "handed_nbytes",
    "ordered_sum_chunk",
    "residual_gather_bytes",
    "ring_allreduce_bytes",
    "sums_in_rank_order",
    "support_nbytes",
    "two_level_intra_bytes",
    "wire_bytes",
]

Route = Literal["local", "allreduce", "allgather", "dense"]
#: How a summing route (``allreduce``, ``dense``) adds fp32 values: ``"ring"``, one all-reduce of the
#: back-end (gloo and NCCL add each chunk in ring order), or ``"rank"``, in rank order (a reduce-scatter
#: that adds in rank order, then an all-gather; ``transport/exchange/ordered.py``).
SumOrder = Literal["ring", "rank"]


def ring_allreduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each worker sends in a ring all-reduce of ``nbytes``: ``2 (K-1)/K * nbytes``."""
    return 2.0 * (world_size - 1) / world_size * nbytes


def broadcast_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each worker sends, on average, in a pipelined ring broadcast of ``nbytes``:
    ``(K-1)/K * nbytes`` (every rank but the last forwards the message once)."""
    return (world_size - 1) / world_size * nbytes


def all_gather_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each worker sends in a ring all-gather of ``nbytes`` per worker: ``(K-1) * nbytes``
    (every payload but its own passes through every worker once)."""
    return float((world_size - 1) * nbytes)


def wire_bytes(route: Route, handed: int, world_size: int) -> float:
    """Bytes one worker puts on the wire for a message of ``handed`` bytes on ``route``: an
    all-gather's ``(K-1) B``, a ring all-reduce's ``2 (K-1)/K B`` (``allreduce`` and ``dense``),
    nothing for ``local``."""
    if route == "local":
        return 0.0
    if route == "allgather":
        return all_gather_bytes(handed, world_size)
    return ring_allreduce_bytes(handed, world_size)


def handed_nbytes(compressor: Compressor, plan: CompressionPlan, route: Route) -> int:
    """Bytes one worker hands to the collective of ``route`` for a message with this plan: the packed
    payload (``allgather``), the ``values`` tensor (``allreduce``), the dense vector in the
    compressor's value dtype (``dense``), nothing (``local``). The exchange hands exactly this (the
    byte tests compare the two)."""
    if route == "local":
        return 0
    if route == "allgather":
        return plan.payload_nbytes
    if route == "allreduce":
        return next(spec.nbytes for spec in plan.payload if spec.name == "values")
    return plan.numel * compressor.value_dtype.itemsize


def support_nbytes(compressor: Compressor, plan: CompressionPlan) -> int:
    """Bytes of the agreed support a ``leader_support`` compressor's leader broadcasts before the
    message (int32 indices; ``topk_shared``), 0 for every other compressor."""
    return 4 * compressor.support_numel(plan) if compressor.leader_support else 0


def two_level_intra_bytes(chunk_numel: int, ranks_per_node: int, element_size: int = 4) -> float:
    """Bytes each rank sends inside its node for one DDP bucket under the sharded 2-D reducer
    (``hierarchy="node"``; ``docs/algorithms.md`` 3.11): ``(G-1) e (2 S + 1)``.

    The bucket's gradient is packed shard-major into G chunks of ``S = chunk_numel`` elements (the
    bucket's largest shard; shorter shards are zero-padded to it) and reduce-scattered: each rank sends
    the G-1 chunks it does not own, ``(G-1) S e`` bytes. After the method, the direction is
    all-gathered with one status element riding behind each shard: chunks of ``S + 1`` elements,
    ``(G-1) (S + 1) e`` bytes. With equal shards (``G S = n``) this is the ring all-reduce's
    ``2 (G-1)/G e n`` (the 2-D floor) plus ``(G-1) e`` for the statuses.

    The node reducer and :class:`~lightning_gmc.HierarchicalSimulator` count their intra-node bytes
    with this function, and the cost model (:mod:`lightning_gmc.plan`) predicts with it.

    Args:
        chunk_numel: ``S``, the bucket's largest shard (``BucketShards.chunk``).
        ranks_per_node: G.
        element_size: bytes per element of the bucket (DDP's gradient dtype: 4 for fp32).
    """
    return float((ranks_per_node - 1) * element_size * (2 * chunk_numel + 1))


def residual_gather_bytes(chunk_numel: int, ranks_per_node: int) -> float:
    """Bytes each rank sends inside its node for the all-gather of the residual under the sharded 2-D
    reducer (``hierarchy="node"``; ``docs/algorithms.md`` 3.11): ``(G-1) 4 S``.

    Methods with a detached gradient point (GMC+, DEF-A, ``ef_server_momentum`` with ``detach > 0``)
    need the node's whole residual on every rank before the forward: once per step, each rank
    all-gathers its share of the model's residual in fp32, padded to the largest rank's share
    ``S = chunk_numel`` (``ShardPlan.largest_share``).

    Args:
        chunk_numel: ``S``, the largest local rank's share of the model, elements.
        ranks_per_node: G.
    """
    return all_gather_bytes(4 * chunk_numel, ranks_per_node)


def choose_route(compressor: Compressor, plan: CompressionPlan, world_size: int) -> Route:
    """Pick the collective for one message (see the module docstring)."""
    if world_size == 1:
        return "local"
    if compressor.shared_support:
        return "allreduce"
    if all_gather_bytes(plan.payload_nbytes, world_size) > ring_allreduce_bytes(4 * plan.numel, world_size):
        return "dense"
    return "allgather"


def check_sum_order(order: object) -> SumOrder:
    """``order`` if it is ``"rank"`` or ``"ring"``, else a ValueError naming both."""
    if order not in ("rank", "ring"):
        raise ValueError(f"fp32_order must be 'rank' or 'ring', got {order!r}")
    return order  # type: ignore[return-value]


def sums_in_rank_order(
    dtype: torch.dtype, world_size: int, fp32_order: SumOrder | None, sparse: bool
) -> bool:
    """Whether a summing route adds values of ``dtype`` in rank order (``docs/algorithms.md`` 3.10):

    * 16-bit values, always (fp32 accumulation, one rounding, the remainder known to its owner: 3.12);
    * fp32 values with ``K >= 3`` (a ring of two adds ``a + b``, rank order's bits): as ``fp32_order``
      says, or, when it is None, for ``sparse`` vectors (a sparse shared support's values, a few
      percent of the bucket: the extra collective and wait cost nothing measurable) and not for dense
      ones (the identity, the dense fallback: measured +34 % to +57 % step time).
    """
    if world_size < 2:
        return False
    if dtype != torch.float32:
        return True
    if world_size < 3:
        return False
    return sparse if fp32_order is None else fp32_order == "rank"


def ordered_sum_chunk(
    numel: int, world_size: int, owner_counts: Sequence[tuple[int, int]] | None = None
) -> int:
    """Elements of one worker's chunk in a sum taken in rank order (``transport/exchange/ordered.py``):
    the reduce-scatter is handed ``K * chunk`` elements per worker.

    fp32 vectors (``owner_counts`` None) are cut into K contiguous chunks: ``ceil(n / K)``. 16-bit
    vectors are laid out owner by owner, element ``j`` of parameter ``p`` owned by worker
    ``(p + j) mod K``: the chunk is the largest owner's share (at least 1).

    Args:
        numel: elements of the summed vector.
        world_size: K.
        owner_counts: for 16-bit values, ``(parameter index, summed elements)`` of every segment.
    """
    if owner_counts is None:
        return -(-numel // world_size)
    shares = [0] * world_size
    for param_index, count in owner_counts:
        whole, extra = divmod(count, world_size)
        for worker in range(world_size):
            shares[worker] += whole
        for j in range(extra):
            shares[(param_index + j) % world_size] += 1
    return max(1, max(shares))


def decode_mean(
    compressor: Compressor,
    plan: CompressionPlan,
    payloads: Sequence[Payload],
    out: Tensor,
) -> Tensor:
    """``out = (1/K) sum_k C_k`` with payloads decoded and summed in rank order (bit-identical on
    every worker that runs it on the same payloads)."""
    if len(payloads) == 1:
        # One worker (K = 1): its payload is the sum, and decode_summed reproduces these bits in
        # fewer passes (compressors override it only where they do).
        return compressor.decode_summed(payloads[0], plan, out, 1)
    out.zero_()
    for payload in payloads:
        compressor.decompress_add(payload, plan, out)
    return out.div_(len(payloads))
