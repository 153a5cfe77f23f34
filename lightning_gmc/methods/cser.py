"""CSER and M-CSER: communication-efficient SGD with error reset (Xie et al. 2020; docs/algorithms.md 2.5).

Each worker i keeps its own model ``x_i``, a local momentum ``m_i`` and a residual ``r_i`` (parameter
units, learning rate inside). With the invariant ``x_i = x_hat - r_i`` for a global model ``x_hat``
that is the same on every worker and never materialised, every step t = 1, 2, ... does::

    g_i   = grad f(x_i) + wd * x_i              # at the worker's OWN model
    m_i   = beta * m_i + g_i                     # local momentum (M-CSER; beta = 0 is CSER)
    d_i   = eta_t * m_i
    dbar  = (1/K) sum_j C1(d_j)                  # per-step partial synchronisation (message 1)
    x_i  <- x_i - dbar - (d_i - C1(d_i))         # the synced part + the local-only remainder
    r_i  <- r_i + (d_i - C1(d_i))
    if t mod H == 0:                             # error reset (message 2)
        ebar = (1/K) sum_j C2(r_j)
        x_i <- x_i + C2(r_i) - ebar
        r_i <- r_i - C2(r_i)

So ``x_i`` moves by ``dbar (+ ebar) + r_i^new - r_i^old`` and the hook hands the optimizer that over
``eta_t`` (``w <- w - eta_t * out``). Ranks hold different models between resets; validation,
testing, prediction and the checkpoint's weights use their average ``(1/K) sum_i x_i = x_hat -
rbar`` (the official Gluon code's ``pre_test``), and training resumes from every rank's own
``x_i``, which the strategy keeps in the checkpoint.

With ``C1 = I`` nothing is left locally and CSER is synchronous local-momentum SGD (= SGD momentum on
the mean gradient); with ``C2 = I`` each reset is a full model average.

Communication (RCC, GMC paper §5; ``docs/algorithms.md`` 3.8): the per-step C1 message plus the C2
message every H steps, both counted by the transport the paper's way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gmc._arguments import check_float, check_int, describe_value
from lightning_gmc.compressors import Compressor, build_compressor
from lightning_gmc.methods._common import add_momentum, check_lr, with_density
from lightning_gmc.methods.base import BucketStep, Message, Method, Undelivered

__all__ = ["CSER"]


class CSER(Method):
    """CSER / M-CSER (``method="cser"``) with a per-step compressor C1 and a reset compressor C2.

    When to use: as the GMC paper's error-reset baseline, or when partial model averaging every H steps
    is preferable to carrying residuals forever. ``momentum`` of the optimizer is M-CSER's local
    momentum (0 gives plain CSER). Tables 1-2 of the GMC paper show it behind GMC and DGC with top-k.

    Args:
        compressor: C1, applied to the per-step update ``eta_t * m_i``.
        reset_compressor: C2, a compressor name or instance; None (default) uses C1's kind and options
            at ``reset_density`` (or C1 itself when it has no density, e.g. a quantizer).
        reset_density: C2's density; None (default) follows the CSER scripts' pattern
            ``rho2 = min(1, H * rho1)`` (so that C2 costs per step about what C1 costs).
        reset_interval: H, steps between error resets (>= 1). The CSER ImageNet configuration
            ``rho1 = 1/64, rho2 = 1/4, H = 16`` gives the default.

    Raises:
        ValueError: ``reset_interval < 1`` or a C2 density outside (0, 1].
    """

    name = "cser"
    buffers = {"momentum": "local", "residual": "local"}
    error_feedback = True
    evaluation_point = "mean_params"

    def __init__(
        self,
        compressor: Compressor,
        reset_compressor: str | Compressor | None = None,
        reset_density: float | None = None,
        reset_interval: int = 16,
    ) -> None:
        super().__init__(compressor)
        self.reset_interval = check_int("reset_interval (H)", reset_interval, minimum=1)
        reset_density = check_float("reset_density", reset_density, "a number in (0, 1]", optional=True)
        density1 = getattr(compressor, "density", None)
        if reset_density is None and density1 is not None:
            reset_density = min(1.0, self.reset_interval * float(density1))
        if reset_compressor is None:
            if density1 is None or reset_density is None:
                reset = compressor  # no density to vary: C1's kind and options
            else:
                reset = with_density(compressor, reset_density, "CSER's reset compressor")
        elif isinstance(reset_compressor, str | Compressor):
            reset = build_compressor(reset_compressor, density=reset_density)
        else:
            raise TypeError(
                f"reset_compressor must be a compressor name, a Compressor instance or None, got "
                f"{describe_value(reset_compressor)}"
            )
        # C2 may equal C1: both messages of a reset step are in flight together, but each message
        # of a step has its own payload workspace (BucketStep.compress), so they share only the plan.
        self.reset_compressor: Compressor = reset

    def compressors(self) -> list[Compressor]:
        return [self.compressor, self.reset_compressor]

    def is_reset_step(self, step_index: int) -> bool:
        """Whether 0-based optimizer step ``step_index`` ends with an error reset (t = step + 1)."""
        return (step_index + 1) % self.reset_interval == 0

    def encode(self, step: BucketStep) -> list[Message]:
        grad = step.grad
        step.add_weight_decay(grad)  # wd at the worker's own model
        momentum = step.buffer("momentum")
        add_momentum(step, momentum, grad)  # m_i = beta m_i + g_i
        residual = step.buffer("residual")
        if self.is_reset_step(step.step):
            # r_i before this step, for the model change r_new - r_old of a reset step (decode).
            step.bucket.workspace("cser_previous_residual").copy_(residual)
        delta = step.bucket.workspace("cser_delta")
        for sl, hyper in step.runs():
            torch.mul(momentum[sl], check_lr(self.name, hyper), out=delta[sl])  # d_i = eta_t m_i
        if step.sends_unchanged(self.compressor):
            # C1(d_i) = d_i: nothing stays local, and dbar is decoded back into d_i's buffer.
            messages = [step.send_as_is(self.compressor, delta, decode_into=delta)]
        else:
            messages = [step.compress(self.compressor, delta)]
            step.subtract_own(messages[0], delta)  # d_i - C1(d_i): the local-only remainder
            residual.add_(delta)  # r_i += d_i - C1(d_i)
        if self.is_reset_step(step.step):
            reset = step.compress(self.reset_compressor, residual, stream_offset=1)
            step.subtract_own(reset, residual)  # r_i <- r_i - C2(r_i)
            messages.append(reset)
        return messages

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        # The model moves by dbar (+ ebar) + r_new - r_old, handed to the optimizer over eta_t. Without
        # a reset r_new - r_old is the remainder d_i - C1(d_i), still in its buffer (zero for a C1 that
        # sends d_i unchanged, whose dbar is that buffer); a reset step adds ebar and reads r_old.
        change = step.out
        if len(means) > 1:
            torch.add(means[0], means[1], out=change)
            change.add_(step.buffer("residual"))
            change.sub_(step.bucket.workspace("cser_previous_residual"))
        elif step.sends_unchanged(self.compressor):
            change = means[0]
        else:
            torch.add(means[0], step.bucket.workspace("cser_delta"), out=change)
        for sl, hyper in step.runs():
            torch.div(change[sl], check_lr(self.name, hyper), out=step.out[sl])

    def absorb_undelivered(self, step: BucketStep, slot: int, undelivered: Undelivered) -> None:
        # Into the residual, and into the model change decode reads (r_new - r_old: the residual itself
        # at a reset step, else the remainder in cser_delta, which also holds dbar when C1 sends d_i
        # unchanged): the worker's model moves by the remainder too, so x_i = x_hat - r_i still holds
        # and the mean model moves by exactly the mean of the d_i.
        undelivered.add_to(step.buffer("residual"))
        if not self.is_reset_step(step.step):
            undelivered.add_to(step.bucket.workspace("cser_delta"))

    def describe(self) -> str:
        return (
            f"cser (H={self.reset_interval}) with C1={self.compressor.describe()}, "
            f"C2={self.reset_compressor.describe()}"
        )
