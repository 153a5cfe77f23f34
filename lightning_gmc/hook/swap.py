"""Temporarily replacing the parameters: the detached point and the evaluation point.

Both move the parameters away from the training values ``w`` for a while and put ``w`` back
bit-exactly:

* the **detached point** ``w - s * residual`` (GMC+, GMC paper section 4; ``docs/algorithms.md``
  section 3.3), where this rank's gradient is evaluated; local, no communication;
* the **evaluation point**, the model validation, tests and checkpoints see for methods whose
  training parameters are not it (CSER's average of the ranks' models, DEF-A's virtual iterate
  ``w - (1/K) sum_k s * residual_k``; ``docs/algorithms.md`` section 3.9); a collective.

The detached point swaps each parameter's data for a spare tensor holding the shifted values (the
training values stay aside, untouched); the evaluation point copies the training values into a
backup buffer. Only one swap can be active at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lightning_gmc.methods import GroupHyper, Method, ParameterTable
from lightning_gmc.transport import Collectives

__all__ = ["ParameterSwap", "all_reduce_mean"]


def all_reduce_mean(flat: Tensor, collectives: Collectives | None) -> None:
    """In-place mean over the workers of ``collectives`` (None: a single worker, nothing to do).

    The evaluation point's one collective, through the same protocol as the gradient exchange; it
    runs outside training steps and is not counted as gradient traffic.
    """
    if collectives is None or collectives.world_size == 1:
        return
    collectives.all_reduce_sum([flat]).wait()
    flat.div_(collectives.world_size)


class ParameterSwap:
    """Moves the bound parameters to the detached or evaluation point and back.

    Args:
        method: decides the scale of the detached point and the kind of evaluation point.
        params: the trainable parameters (in the :class:`ParameterTable` order).
        table: their names, shapes and param groups.
        residuals: this rank's residual per parameter (flat fp32), or a function returning it when
            it is needed (a collective under ``hierarchy="node"``, where it is gathered from the node's
            shards: called on every rank at the same point), or None for methods without one.
        collectives: where the evaluation point averages (None: a single worker).
    """

    def __init__(
        self,
        method: Method,
        params: Sequence[nn.Parameter],
        table: ParameterTable,
        residuals: Sequence[Tensor] | Callable[[], Sequence[Tensor] | None] | None,
        collectives: Collectives | None = None,
    ) -> None:
        self.method = method
        self.params = list(params)
        self.table = table
        self.residuals = residuals
        self.collectives = collectives
        self.active: str | None = None  # "detached" or "evaluation" while moved
        self._backup: list[Tensor] | None = None
        # Detached point: one spare tensor per parameter, and the training tensors held aside.
        self._spares: list[Tensor] | None = None
        self._held: list[tuple[nn.Parameter, Tensor]] = []

    def _residuals(self) -> Sequence[Tensor]:
        residuals = self.residuals() if callable(self.residuals) else self.residuals
        assert residuals is not None, "a method with a detached or residual evaluation point keeps a residual"
        return residuals

    # ------------------------------------------------------------------ backup and restore
    def _save(self, kind: str) -> None:
        if self._backup is None:
            self._backup = [torch.empty_like(p) for p in self.params]
        with torch.no_grad():
            for p, backup in zip(self.params, self._backup, strict=True):
                backup.copy_(p)
        self.active = kind

    def _refuse_nesting(self, kind: str) -> None:
        if self.active is not None:
            raise RuntimeError(
                f"cannot move the parameters to the {kind} point while they are at the {self.active} "
                f"point; leave it first"
            )

    def training_values(self) -> list[Tensor]:
        """The training parameters' values, also while a swap is active (then from the backup)."""
        if self.active == "detached":
            held = {id(p): training for p, training in self._held}
            return [held.get(id(p), p.detach()) for p in self.params]
        if self.active is not None:
            assert self._backup is not None
            return self._backup
        return [p.detach() for p in self.params]

    def restore(self, kind: str) -> None:
        """Put back the parameters saved when the ``kind`` swap began (no-op if it is not active)."""
        if self.active != kind:
            return
        if kind == "detached":
            self._leave_detached()
            return
        assert self._backup is not None
        with torch.no_grad():
            for p, backup in zip(self.params, self._backup, strict=True):
                p.copy_(backup)
        self.active = None

    # ---------------------------------------------------------------------- detached point
    def enter_detached(self, hypers: Sequence[GroupHyper]) -> None:
        """Move to ``w - s * residual`` (no-op when the method has no detached point or a swap is on).

        One pass over the parameters: ``w - s * residual`` is written into a spare tensor per
        parameter and swapped in as the parameter's data, while ``w`` itself stays untouched aside;
        leaving swaps it back, so the restore is bit-exact and costs no pass at all (against three
        passes for a backup copy, a shift and a copy back).
        """
        if self.active == "detached" or self.residuals is None:
            return
        self._refuse_nesting("detached")
        scales = [self.method.detach_scale(hypers[g]) for g in self.table.groups]
        if not any(scales):
            return
        if self._spares is None:
            self._spares = [torch.empty_like(p) for p in self.params]
        held: list[tuple[nn.Parameter, Tensor]] = []
        residuals = self._residuals()
        with torch.no_grad():
            shifts = zip(self.params, residuals, scales, self._spares, strict=True)
            for p, residual, scale, spare in shifts:
                if scale:
                    # The same bits as p.add_(residual.to(p.dtype), alpha=-scale) in place.
                    torch.add(p, residual.view_as(p).to(p.dtype), alpha=-scale, out=spare)
                    held.append((p, p.data))
                    p.data = spare
        self._held = held
        self.active = "detached"

    def _leave_detached(self) -> None:
        # Each spare keeps its own storage (p.data = spare only made p share it): reused next step.
        for p, training in self._held:
            p.data = training
        self._held = []
        self.active = None

    @contextlib.contextmanager
    def detached(self, hypers: Sequence[GroupHyper]) -> Iterator[None]:
        self.enter_detached(hypers)
        try:
            yield
        finally:
            self.restore("detached")

    # -------------------------------------------------------------------- evaluation point
    @property
    def evaluation_differs(self) -> bool:
        return self.method.evaluation_point != "params"

    def enter_evaluation(self, hypers: Sequence[GroupHyper]) -> None:
        """Move to the method's evaluation model (a collective: every rank must call it)."""
        if not self.evaluation_differs or self.active == "evaluation":
            return
        self._refuse_nesting("evaluation")
        self._save("evaluation")
        mean_params = self.method.evaluation_point == "mean_params"
        with torch.no_grad():
            if mean_params:
                flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in self.params])
            else:  # params_minus_mean_residual
                flat = torch.cat(
                    [
                        r * self.method.evaluation_residual_scale(hypers[group])
                        for r, group in zip(self._residuals(), self.table.groups, strict=True)
                    ]
                )
            all_reduce_mean(flat, self.collectives)
            offset = 0
            for p in self.params:
                chunk = flat[offset : offset + p.numel()].view_as(p)
                if mean_params:
                    p.copy_(chunk)
                else:
                    p.sub_(chunk.to(p.dtype))
                offset += p.numel()

    @contextlib.contextmanager
    def evaluation(self, hypers: Sequence[GroupHyper]) -> Iterator[None]:
        """At the evaluation point inside the block; re-entrant (a checkpoint written during
        validation, which is already there, leaves it there)."""
        if self.active == "evaluation":
            yield
            return
        self.enter_evaluation(hypers)
        try:
            yield
        finally:
            self.restore("evaluation")
