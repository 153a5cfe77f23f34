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
from lightning_gmc.compressors import Compressor
from lightning_gmc.methods._common import add_momentum, check_lr, resolve_compressor, with_density
from lightning_gmc.methods.base import BucketStep, Message, Method

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
            reset = resolve_compressor(reset_compressor, reset_density)
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
        add_momentum(step, momentum, grad)
        residual = step.buffer("residual")
        # r_i before this step, for the model change r_new - r_old in decode.
        step.bucket.workspace("cser_previous_residual").copy_(residual)
        delta = step.bucket.workspace("cser_delta")
        for sl, hyper in step.runs():
            torch.mul(momentum[sl], check_lr(self.name, hyper), out=delta[sl])  # d_i = eta_t m_i
        first = step.compress(self.compressor, delta)
        step.subtract_own(first, delta)  # d_i - C1(d_i): the local-only remainder
        residual.add_(delta)
        messages = [first]
        if self.is_reset_step(step.step):
            second = step.compress(self.reset_compressor, residual, stream_offset=1)
            step.subtract_own(second, residual)  # r_i <- r_i - C2(r_i)
            messages.append(second)
        return messages

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        # eta_t * out = dbar (+ ebar) + r_new - r_old, summed in that order straight into out (the
        # same bits as a copy of dbar followed by in-place adds).
        change = step.out
        residual = step.buffer("residual")
        if len(means) > 1:
            torch.add(means[0], means[1], out=change)
            for mean in means[2:]:
                change.add_(mean)
            change.add_(residual)
        else:
            torch.add(means[0], residual, out=change)
        change.sub_(step.bucket.workspace("cser_previous_residual"))
        for sl, hyper in step.runs():
            change[sl].div_(check_lr(self.name, hyper))

    def describe(self) -> str:
        return (
            f"cser (H={self.reset_interval}) with C1={self.compressor.describe()}, "
            f"C2={self.reset_compressor.describe()}"
        )
