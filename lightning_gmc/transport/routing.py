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

from torch import Tensor

from lightning_gmc.compressors import CompressionPlan, Compressor, Payload

__all__ = [
    "Route",
    "all_gather_bytes",
    "broadcast_bytes",
    "choose_route",
    "decode_mean",
    "handed_nbytes",
    "ring_allreduce_bytes",
    "support_nbytes",
    "two_level_intra_bytes",
    "wire_bytes",
]

Route = Literal["local", "allreduce", "allgather", "dense"]


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


def two_level_intra_bytes(
    shard_numel: int, ranks_per_node: int, element_size: int = 4, shift: bool = False
) -> float:
    """Bytes each rank sends inside its node per bucket under the sharded 2-D reducer
    (``hierarchy="node"``; ``docs/algorithms.md`` 3.11).

    The node's G ranks reduce-scatter the bucket's gradient into G shards of ``shard_numel``
    elements (each rank sends the G-1 shards it does not own: ``(G-1) s e`` bytes), run the method on
    their own shard, and all-gather the direction (``(G-1) s e`` again): ``2 (G-1) s e``, which for
    ``s = n / G`` is the ring all-reduce's ``2 (G-1)/G * e n``. Methods with a detached point
    (``shift=True``: GMC+, DEF-A, ``ef_server_momentum`` with ``detach > 0``) also all-gather the
    residual shift in fp32 before the forward: ``(G-1) s 4`` more.

    Args:
        shard_numel: elements of one shard as the collectives see it (padded to the bucket's largest
            shard when shards are unequal).
        ranks_per_node: G.
        element_size: bytes per element of the reduce-scatter and the all-gather (4 for fp32).
        shift: add the all-gather of the residual shift.
    """
    per_phase = (ranks_per_node - 1) * shard_numel
    return float(2 * per_phase * element_size + (per_phase * 4 if shift else 0))


def choose_route(compressor: Compressor, plan: CompressionPlan, world_size: int) -> Route:
    """Pick the collective for one message (see the module docstring)."""
    if world_size == 1:
        return "local"
    if compressor.shared_support:
        return "allreduce"
    if all_gather_bytes(plan.payload_nbytes, world_size) > ring_allreduce_bytes(4 * plan.numel, world_size):
        return "dense"
    return "allgather"


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
