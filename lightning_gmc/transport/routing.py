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
    "broadcast_bytes",
    "check_sum_order",
    "choose_route",
    "decode_mean",
    "ring_allreduce_bytes",
    "sums_in_rank_order",
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


def choose_route(compressor: Compressor, plan: CompressionPlan, world_size: int) -> Route:
    """Pick the collective for one message (see the module docstring)."""
    if world_size == 1:
        return "local"
    if compressor.shared_support:
        return "allreduce"
    gather_bytes = (world_size - 1) * plan.payload_nbytes
    if gather_bytes > ring_allreduce_bytes(4 * plan.numel, world_size):
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
