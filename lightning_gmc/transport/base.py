"""Aggregation maths and traffic accounting shared by every transport.

How a message crosses ranks depends only on its compressor and the world size K:

* ``allreduce``: the compressor's support is shared and decoding is linear, so the ``values`` tensors
  are summed by one all-reduce and decoded once (identity, RBGS, shared-seed random-k).
* ``allgather``: every rank's payload is packed into one fixed-size byte buffer, all-gathered once,
  and each rank's part is decoded and summed in rank order (top-k, quantizers).
* ``dense``: an all-gather would put more bytes on the wire than a dense all-reduce of the bucket
  (``(K-1) * B > 2 (K-1)/K * 4 n``, ``spec/performance.md`` §2.2), so the rank decodes its own
  payload locally and the dense vectors are all-reduced. The maths is unchanged: only the transport
  differs.

Wire bytes per rank follow the ring model of §2.2; they are what the ``bytes_sent`` metric reports.
RCC follows the paper's parameter-server accounting (spec §6.5): ``sum_k bits(C(u_k))`` up plus the
bits of ``sum_k C(u_k)`` down, over ``(K+1) * 32 * d`` per step.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_gmc.compressors import CompressionPlan, Compressor, Payload

__all__ = ["CommStats", "Route", "choose_route", "decode_mean", "ring_allreduce_bytes"]

Route = Literal["local", "allreduce", "allgather", "dense"]


def ring_allreduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: ``2 (K-1)/K * nbytes``."""
    return 2.0 * (world_size - 1) / world_size * nbytes


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


def decode_mean(
    compressor: Compressor,
    plan: CompressionPlan,
    payloads: Sequence[Payload],
    out: Tensor,
) -> Tensor:
    """``out = (1/K) sum_k C_k`` with payloads decoded and summed in rank order (bit-identical on
    every rank that runs it on the same payloads)."""
    if len(payloads) == 1:
        # One worker (K = 1): its payload is the sum, and decode_summed reproduces these bits in
        # fewer passes (compressors override it only where they do).
        return compressor.decode_summed(payloads[0], plan, out, 1)
    out.zero_()
    for payload in payloads:
        compressor.decompress_add(payload, plan, out)
    return out.div_(len(payloads))


@dataclass
class CommStats:
    """Traffic counters of one worker, accumulated per step and over the run.

    All byte counts are per rank. ``*_total`` fields survive :meth:`take_step` and are checkpointed,
    so cumulative RCC continues across a resume.
    """

    bytes_sent: float = 0.0
    bytes_to_collectives: int = 0
    dense_bytes: float = 0.0
    numel: int = 0
    nnz: int = 0
    collectives: int = 0
    rcc_bits: float = 0.0
    rcc_dense_bits: float = 0.0
    nonfinite_skips: int = 0
    bytes_sent_total: float = 0.0
    dense_bytes_total: float = 0.0
    rcc_bits_total: float = 0.0
    rcc_dense_bits_total: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict[str, object]:
        # The strategy is pickled by start_method="spawn"; a lock cannot be.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def record_bucket(self, numel: int, world_size: int, element_size: int = 4) -> None:
        """Count one bucket of one step: the dense-equivalent bytes and the RCC denominator."""
        with self._lock:
            self.numel += numel
            self.dense_bytes += ring_allreduce_bytes(element_size * numel, world_size)
            self.rcc_dense_bits += (world_size + 1) * 32.0 * numel

    def record_message(
        self,
        route: Route,
        world_size: int,
        handed_bytes: int,
        nnz: int,
        upload_bits: float,
    ) -> None:
        """Count one message: bytes handed to its collective, wire bytes, and RCC upload bits."""
        if route == "allgather":
            wire = float((world_size - 1) * handed_bytes)
        elif route == "local":
            wire = 0.0
        else:
            wire = ring_allreduce_bytes(handed_bytes, world_size)
        with self._lock:
            self.bytes_to_collectives += handed_bytes if route != "local" else 0
            self.collectives += 1 if route != "local" else 0
            self.bytes_sent += wire
            self.nnz += nnz
            self.rcc_bits += world_size * upload_bits

    def record_broadcast(self, bits: float) -> None:
        """Count the server-to-worker bits of one message's aggregate (RCC numerator)."""
        with self._lock:
            self.rcc_bits += bits

    def take_step(self) -> dict[str, float]:
        """Return this step's metrics, fold them into the run totals and reset the step counters."""
        with self._lock:
            self.bytes_sent_total += self.bytes_sent
            self.dense_bytes_total += self.dense_bytes
            self.rcc_bits_total += self.rcc_bits
            self.rcc_dense_bits_total += self.rcc_dense_bits
            metrics = {
                "bytes_sent": self.bytes_sent,
                "dense_bytes": self.dense_bytes,
                "bytes_sent_total": self.bytes_sent_total,
                "dense_bytes_total": self.dense_bytes_total,
                "density": self.nnz / self.numel if self.numel else 0.0,
                "rcc": self.rcc_bits_total / self.rcc_dense_bits_total if self.rcc_dense_bits_total else 0.0,
                "rcc_step": self.rcc_bits / self.rcc_dense_bits if self.rcc_dense_bits else 0.0,
                "collectives": float(self.collectives),
                "bytes_to_collectives": float(self.bytes_to_collectives),
                "nonfinite_skips": float(self.nonfinite_skips),
            }
            self.bytes_sent = self.dense_bytes = self.rcc_bits = self.rcc_dense_bits = 0.0
            self.numel = self.nnz = self.collectives = self.bytes_to_collectives = 0
            return metrics

    def state_dict(self) -> dict[str, float]:
        return {
            "bytes_sent_total": self.bytes_sent_total,
            "dense_bytes_total": self.dense_bytes_total,
            "rcc_bits_total": self.rcc_bits_total,
            "rcc_dense_bits_total": self.rcc_dense_bits_total,
            "nonfinite_skips": float(self.nonfinite_skips),
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.bytes_sent_total = float(state["bytes_sent_total"])
        self.dense_bytes_total = float(state["dense_bytes_total"])
        self.rcc_bits_total = float(state["rcc_bits_total"])
        self.rcc_dense_bits_total = float(state["rcc_dense_bits_total"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))


def nonzero_bits(compressor: Compressor, mean: Tensor) -> float:
    """Broadcast bits estimated from a dense aggregate (used when the dense route hides the payloads)."""
    if compressor.sparse:
        return 64.0 * int(torch.count_nonzero(mean))
    return 32.0 * mean.numel()
