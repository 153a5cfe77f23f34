"""Refusing a step: with ``wire_dtype="fp16"`` an overflow on the wire undoes the whole step.

A sum (or a value) beyond fp16's +-65504 arrives as inf on every rank alike, at the same bucket
(``transport/exchange``: fp16 exchanges are waited for and decoded in the hook body, and raise
:class:`~lightning_gmc.transport.WireOverflow` there). :class:`StepRefusal` then puts back everything
the step changed, on every rank: the method's buffers of every bucket the step touched (the reducer's
:meth:`~lightning_gmc.hook.reducer.Reducer.restore_step`), the traffic counters, the skipped-bucket
events and the step clock. The refused bucket's future and those of the step's later buckets (which
issue no collective) carry the error, which DDP raises from ``backward()`` on every rank; a caller
that catches it and goes on continues from the state before the step.

Costs, only for fp16: one copy of the method state per step (kept in workspaces allocated once), and
no overlap of a bucket's communication with the rest of the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.futures import Future

from lightning_gmc.hook.binding import StepClock
from lightning_gmc.hook.metrics import HookMetrics
from lightning_gmc.transport import CommStats, WireOverflow

__all__ = ["StepRefusal", "failed_future"]


def failed_future(error: BaseException) -> Future[Tensor]:
    """A completed future that raises ``error`` when waited on. Failed through a callback, as a failed
    collective's is: DDP then raises ``RuntimeError: ... WireOverflow: <message>`` from ``backward()``
    (``Future.set_exception`` would reach DDP's C++ side as a value it cannot cast)."""
    done: Future[Tensor] = Future()
    done.set_result(torch.empty(0))

    def fail(_: Future[Tensor]) -> Tensor:
        raise error

    return done.then(fail)


class StepRefusal:
    """What a refused step restores (module docstring).

    Args:
        enabled: whether steps can be refused (the method sends fp16); nothing is kept otherwise.
        clock: the step clock.
        stats: the traffic counters.
        metrics: the per-step metrics (skipped-bucket events).
        restore_buffers: puts back the method buffers of every bucket of the step (the reducer's).
    """

    def __init__(
        self,
        enabled: bool,
        clock: StepClock,
        stats: CommStats,
        metrics: HookMetrics,
        restore_buffers: Callable[[], None],
    ) -> None:
        self.enabled = enabled
        self.clock = clock
        self.stats = stats
        self.metrics = metrics
        self.restore_buffers = restore_buffers
        #: the overflow of the step being refused (None: the step runs)
        self.error: WireOverflow | None = None
        self._counters: dict[str, Any] | None = None
        self._skips: Tensor | None = None

    def begin_bucket(self, first_of_step: bool) -> None:
        """Keep the counters as the step begins (call before anything of the bucket is counted)."""
        if self.enabled and first_of_step:
            self._counters = self.stats.snapshot()
            self._skips = self.metrics.pending_nonfinite()

    def refuse(self, error: WireOverflow) -> Future[Tensor]:
        """Undo the step so far; this bucket's future and the step's later ones carry ``error``."""
        try:
            self.restore_buffers()
        except NotImplementedError as err:  # a reducer that cannot restore its buffers (yet)
            error = WireOverflow(
                f"{error} NOT restored: {err}; the method's state of this step is lost, resume from the last "
                f"checkpoint"
            )
        if self._counters is not None:
            self.stats.restore(self._counters)
        self.metrics.set_pending_nonfinite(self._skips)
        self.error = error
        return failed_future(error)

    def end_step(self) -> bool:
        """At the step's last bucket: True when the step was refused (the clock does not advance; the
        next step begins afresh)."""
        refused = self.error is not None
        if refused:
            self.clock.abandon_step()
            self.error = None
        return refused
