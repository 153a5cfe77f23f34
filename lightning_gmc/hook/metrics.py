"""Per-step metrics of the hook: traffic (counted by the transport), skipped buckets, residual norm."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gmc.hook.hierarchy import IntraNodeTraffic
from lightning_gmc.methods import WorkerState
from lightning_gmc.transport import CommStats

__all__ = ["HookMetrics"]


class HookMetrics:
    """Collects what one rank logs per step.

    Args:
        stats: the traffic counters the transport updates.
    """

    def __init__(self, stats: CommStats) -> None:
        self.stats = stats
        self._nonfinite_pending: Tensor | None = None
        #: bytes sent inside the node (hierarchy="node" only); then ``stats`` counts the inter-node
        #: exchange, reported as ``bytes_sent`` and ``bytes_sent_inter``.
        self.intra: IntraNodeTraffic | None = None

    def count_nonfinite(self, skipped: Tensor) -> None:
        """Accumulate skipped-bucket events on the device (read once per step by :meth:`take`)."""
        pending = skipped.to(torch.int64)
        self._nonfinite_pending = (
            pending if self._nonfinite_pending is None else self._nonfinite_pending + pending
        )

    def take(self, worker: WorkerState | None) -> dict[str, float]:
        """This step's traffic metrics plus the residual norm; resets the per-step counters."""
        if self._nonfinite_pending is not None:
            self.stats.nonfinite_skips += int(self._nonfinite_pending)
            self._nonfinite_pending = None
        metrics = self.stats.take_step()
        metrics["residual_norm"] = residual_norm(worker)
        if self.intra is not None:
            metrics["bytes_sent_inter"] = metrics["bytes_sent"]
            metrics["bytes_sent_intra"] = self.intra.take_step()
        return metrics


def residual_norm(worker: WorkerState | None) -> float:
    """L2 norm of a worker's residual (0 for methods without one)."""
    if worker is None or "residual" not in worker.tensors:
        return 0.0
    return worker.squared_norm("residual") ** 0.5
