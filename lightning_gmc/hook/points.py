"""The detached and evaluation points of :class:`~lightning_gmc.hook.GMCHookState`, as a base class.

The parameter moves themselves are :class:`~lightning_gmc.hook.swap.ParameterSwap`'s; this is the
public face the state shows the training loop (and the Lightning and Fabric adapters), in the way
Lightning's ``LightningModule`` gathers its hook groups from base classes (``ModelHooks``,
``CheckpointHooks``): a block per point, and an enter/exit pair for loops whose start and end are
separate callbacks. Before ``attach`` there is no swap and every call here is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lightning_gmc.hook.swap import ParameterSwap
from lightning_gmc.methods import GroupHyper

__all__ = ["ParameterPoints"]


class ParameterPoints:
    """The point API of :class:`~lightning_gmc.hook.GMCHookState` over its :attr:`swap`.

    Subclasses set :attr:`swap` (None until the parameters are bound) and give
    :meth:`current_hypers` (the scale of the detached point and of a residual evaluation point
    depends on the step's learning rate and momentum).
    """

    #: moves the bound parameters to a point and back (None before ``attach``)
    swap: ParameterSwap | None

    def current_hypers(self) -> list[GroupHyper]:
        """Hyper-parameters of the step about to run."""
        raise NotImplementedError

    @contextlib.contextmanager
    def detached_point(self) -> Iterator[None]:
        """Evaluate the gradient at the method's detached point (GMC+, DEF-A) inside this block: the
        parameters move to ``w - s * residual`` on entry and back bit-exactly on exit. Wrap the forward
        *and* backward of every micro-batch of a step."""
        self.enter_detached_point()
        try:
            yield
        finally:
            self.exit_detached_point()

    def enter_detached_point(self) -> None:
        """The entry of :meth:`detached_point`, for loops that cannot wrap the step in one block."""
        if self.swap is not None:
            self.swap.enter_detached(self.current_hypers())

    def exit_detached_point(self) -> None:
        """The exit of :meth:`detached_point` (a no-op when the parameters are not there)."""
        if self.swap is not None:
            self.swap.restore("detached")

    @property
    def evaluation_differs(self) -> bool:
        """True when the method evaluates a model other than the training parameters."""
        return self.swap is not None and self.swap.evaluation_differs

    @contextlib.contextmanager
    def evaluation_point(self) -> Iterator[None]:
        """The method's evaluation model inside this block (a collective: enter on every rank).
        Re-entrant: inside a block already at the evaluation point it stays there."""
        if self.swap is None:
            yield
            return
        with self.swap.evaluation(self.current_hypers()):
            yield

    def enter_evaluation_point(self) -> None:
        """The entry of :meth:`evaluation_point`, for loops whose start and end are separate callbacks
        (a collective: every rank must call it)."""
        if self.swap is not None:
            self.swap.enter_evaluation(self.current_hypers())

    def exit_evaluation_point(self) -> None:
        """The exit of :meth:`evaluation_point` (a no-op when the parameters are not there)."""
        if self.swap is not None:
            self.swap.restore("evaluation")
