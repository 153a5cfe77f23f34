"""Per-step metrics of the hook: traffic (counted by the transport), skipped buckets, residual norm."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gmc.methods import WorkerState
from lightning_gmc.transport import CommStats

__all__ = ["HookMetrics", "residual_norm_squared", "sum_over_ranks"]


class HookMetrics:
    """Collects what one rank logs per step.

    Args:
        stats: the traffic counters the transport updates.
    """

    def __init__(self, stats: CommStats) -> None:
        self.stats = stats
        self._nonfinite_pending: Tensor | None = None

    def count_nonfinite(self, skipped: Tensor) -> None:
        """Accumulate skipped-bucket events on the device (read once per step by :meth:`take`)."""
        pending = skipped.to(torch.int64)
        self._nonfinite_pending = (
            pending if self._nonfinite_pending is None else self._nonfinite_pending + pending
        )

    def pending_nonfinite(self) -> Tensor | None:
        """The skipped-bucket events not read yet (a device tensor, or None)."""
        return self._nonfinite_pending

    def set_pending_nonfinite(self, pending: Tensor | None) -> None:
        """Put back what :meth:`pending_nonfinite` returned (a refused step's events are not counted)."""
        self._nonfinite_pending = pending

    def flush_nonfinite(self) -> None:
        """Fold the skipped-bucket events not read yet into the run total (one host sync), so that
        a checkpoint written between logging steps keeps them."""
        pending, self._nonfinite_pending = self._nonfinite_pending, None
        if pending is not None:
            self.stats.nonfinite_skips += int(pending.item())

    def take(self, worker: WorkerState | None, device_values: bool = True) -> dict[str, float]:
        """This step's traffic metrics, with :meth:`device_values` unless ``device_values`` is False
        (then without ``residual_norm`` and ``nonfinite_skips``: no pass over the residual and no host
        synchronisation, for steps whose metrics nobody reads); resets the per-step counters."""
        metrics = self.stats.take_step()
        del metrics["nonfinite_skips"]
        if device_values:
            metrics.update(self.device_values(worker))
        return metrics

    def device_values(self, worker: WorkerState | None) -> dict[str, float]:
        """The residual norm as it is now and the run's skipped non-finite buckets, read back together
        in one host synchronisation (the skipped-bucket events pending on the device are folded in)."""
        parts: list[Tensor] = []
        norm = residual_norm_squared(worker)
        if norm is not None:
            parts.append(norm)
        pending = self._nonfinite_pending
        if pending is not None:
            parts.append(pending.to(norm.device if norm is not None else pending.device, torch.float64))
            self._nonfinite_pending = None
        values = torch.stack(parts).tolist() if parts else []
        if pending is not None:
            self.stats.nonfinite_skips += int(values.pop())
        return {
            "residual_norm": float(values[0]) ** 0.5 if norm is not None else 0.0,
            "nonfinite_skips": float(self.stats.nonfinite_skips),
        }


def residual_norm_squared(worker: WorkerState | None) -> Tensor | None:
    """Squared L2 norm of a worker's residual as a float64 device scalar (None without a residual).

    Per-parameter norms come from one multi-tensor kernel; nothing is copied and nothing is read
    back here.
    """
    if worker is None or "residual" not in worker.tensors:
        return None
    norms = torch._foreach_norm(worker.tensors["residual"])
    return torch.stack(norms).to(torch.float64).square().sum()


def sum_over_ranks(
    values: Mapping[str, float], process_group: dist.ProcessGroup | None, device: torch.device
) -> dict[str, float]:
    """Each value summed over the ranks of ``process_group`` in one all-reduce of a small float64
    vector (a collective: every rank must call it at the same point; the identity without a group).

    Issued on torch.distributed directly, not through the exchange's collectives: it is logging, and
    the exchange's back-end carries (and its wrappers count) the gradient traffic only."""
    names = list(values)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return {name: float(values[name]) for name in names}
    vector = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(vector, group=process_group)
    return dict(zip(names, vector.tolist(), strict=True))
