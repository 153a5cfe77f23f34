"""Traffic accounting of one process: wire bytes per worker and the paper's RCC.

Wire bytes per worker follow the ring model: ``(K-1) B`` for an all-gather of ``B`` bytes,
``2 (K-1)/K B`` for an all-reduce, ``(K-1)/K B`` for a broadcast; they are what the ``bytes_sent``
metric reports.

RCC (relative communication cost) follows the parameter-server accounting of the GMC paper ("Global
Momentum Compression for Sparse Communication in Distributed Learning", section 5, eq. (9); see
``docs/algorithms.md`` 3.8): ``sum_k bits(C(u_k))`` up plus the bits
of ``sum_k C(u_k)`` down, over ``(K+1) * 32 * d`` per step.

When RCC is measured: the downlink bits of an all-gathered sparse message are the union of the K
supports, a ``unique()`` over every index (a sort, and a device sync on GPU). With
``defer_rcc=True`` (the DDP hook's setting) that count is deferred to :meth:`CommStats.take_step`,
so it only runs on steps whose metrics are taken; a step whose metrics are never taken (its
successor starts first) drops its RCC numerator and denominator together, and the cumulative
``rcc`` is the ratio over the steps that were taken. The Lightning strategy takes the metrics of
every optimizer step, so its ``rcc`` counts every step. With ``defer_rcc=False``
(the simulator) every step is counted eagerly, whenever the metrics are read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from lightning_gmc.transport.routing import Route, broadcast_bytes, ring_allreduce_bytes, wire_bytes

__all__ = ["CommStats"]

#: A step's downlink bits for RCC, computed when the metrics are taken (see the module docstring).
BitsCounter = Callable[[], float]


@dataclass
class CommStats:
    """Traffic counters of one process, accumulated per step and over the run.

    All byte counts are per worker (a rank; the simulator records what one rank would see).
    ``*_total`` fields survive :meth:`take_step` and are checkpointed, so cumulative RCC continues
    across a resume.

    Args:
        defer_rcc: count RCC downlink bits only for steps whose metrics are taken (module docstring).
    """

    defer_rcc: bool = False
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
    _rcc_step: int | None = field(default=None, repr=False, compare=False)
    _rcc_pending: list[BitsCounter] = field(default_factory=list, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict[str, object]:
        # The strategy is pickled by start_method="spawn"; a lock and pending closures cannot be.
        state = dict(self.__dict__)
        del state["_lock"]
        state["_rcc_pending"] = []
        state["_rcc_step"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _enter_step(self, step: int) -> None:
        # Caller holds the lock. A deferred step whose metrics were not taken drops its RCC.
        if self.defer_rcc and self._rcc_step is not None and self._rcc_step != step:
            self.rcc_bits = self.rcc_dense_bits = 0.0
            self._rcc_pending.clear()
        self._rcc_step = step

    def record_bucket(self, numel: int, world_size: int, element_size: int, step: int) -> None:
        """Count one bucket of one step: the dense-equivalent bytes and the RCC denominator."""
        with self._lock:
            self._enter_step(step)
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
        step: int,
    ) -> None:
        """Count one message: bytes handed to its collective, wire bytes, and RCC upload bits."""
        wire = wire_bytes(route, handed_bytes, world_size)
        with self._lock:
            self._enter_step(step)
            self.bytes_to_collectives += handed_bytes if route != "local" else 0
            self.collectives += 1 if route != "local" else 0
            self.bytes_sent += wire
            self.nnz += nnz
            self.rcc_bits += world_size * upload_bits

    def record_rank_ordered_sum(
        self,
        route: Route,
        world_size: int,
        padded_bytes: int,
        nnz: int,
        upload_bits: float,
        step: int,
    ) -> None:
        """Count one message summed in rank order: a reduce-scatter of ``padded_bytes`` (the vector padded
        to ``K`` equal chunks) and an all-gather of one chunk, two collectives; on the wire ``(K-1)/K``
        of the padded vector each, a ring all-reduce's ``2 (K-1)/K``."""
        with self._lock:
            self._enter_step(step)
            self.bytes_to_collectives += padded_bytes + padded_bytes // world_size
            self.collectives += 2
            self.bytes_sent += ring_allreduce_bytes(padded_bytes, world_size)
            self.nnz += nnz
            self.rcc_bits += world_size * upload_bits

    def record_support(self, handed_bytes: int, world_size: int, step: int) -> None:
        """Count the broadcast of an agreed support (``topk_shared``'s leader indices).

        Wire bytes per worker: ``(K-1)/K * B`` (a pipelined ring broadcast forwards ``B`` on every
        link but one). RCC: the leader's indices go up once and come down once, ``2 * 8 B`` bits
        (``docs/algorithms.md`` 3.8).
        """
        with self._lock:
            self._enter_step(step)
            self.bytes_to_collectives += handed_bytes
            self.collectives += 1
            self.bytes_sent += broadcast_bytes(handed_bytes, world_size)
            self.rcc_bits += 2 * 8.0 * handed_bytes

    def record_broadcast(self, bits: BitsCounter, step: int) -> None:
        """Count the server-to-worker bits of one message's aggregate (RCC numerator).

        ``bits`` may read the exchanged buffers: it runs now, or (``defer_rcc``) in
        :meth:`take_step`, before the next step's exchange reuses them.
        """
        with self._lock:
            self._enter_step(step)
            if self.defer_rcc:
                self._rcc_pending.append(bits)
            else:
                self.rcc_bits += bits()

    def take_step(self) -> dict[str, float]:
        """Return this step's metrics, fold them into the run totals and reset the step counters."""
        with self._lock:
            for counter in self._rcc_pending:
                self.rcc_bits += counter()
            self._rcc_pending.clear()
            self._rcc_step = None
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

    def snapshot(self) -> dict[str, object]:
        """Every counter, per step and run totals, as it is now (to undo a refused step with
        :meth:`restore`)."""
        with self._lock:
            saved = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
            saved["_rcc_pending"] = list(self._rcc_pending)
            return saved

    def restore(self, saved: dict[str, object]) -> None:
        """Put back the counters of :meth:`snapshot`."""
        with self._lock:
            for name, value in saved.items():
                setattr(self, name, list(value) if isinstance(value, list) else value)

    def state_dict(self) -> dict[str, float]:
        """Run totals (what a checkpoint keeps)."""
        return {
            "bytes_sent_total": self.bytes_sent_total,
            "dense_bytes_total": self.dense_bytes_total,
            "rcc_bits_total": self.rcc_bits_total,
            "rcc_dense_bits_total": self.rcc_dense_bits_total,
            "nonfinite_skips": float(self.nonfinite_skips),
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the run totals of :meth:`state_dict`."""
        self.bytes_sent_total = float(state["bytes_sent_total"])
        self.dense_bytes_total = float(state["dense_bytes_total"])
        self.rcc_bits_total = float(state["rcc_bits_total"])
        self.rcc_dense_bits_total = float(state["rcc_dense_bits_total"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
