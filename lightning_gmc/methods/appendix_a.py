"""The GMC paper's Appendix A alternatives to GMC (``docs/algorithms.md`` 2.7-2.8), and the detached
point on Algorithm 3 (2.9).

Both satisfy GMC's rewritten update (7) at a constant learning rate; the paper's Fig. 7 shows both
behind GMC, especially on non-IID data. They exist to reproduce that ablation.

Algorithm 3, error feedback on gradients with momentum on the aggregate ("server momentum")::

    x_k     = w_t - detach * eta_t * e_k       # gradient point; detach = 0 (default) is Algorithm 3
    p_k     = e_k + g_k(x_k) + wd * x_k
    send C(p_k);  e_k <- p_k - C(p_k)          # the residual holds no momentum
    m_t     = beta * m_{t-1} + (1/K) sum_k C(p_k)
    w_{t+1} = w_t - eta_t * m_t

With ``detach > 0`` it is "GMC+ with momentum on the aggregate": the gradient is taken at GMC+'s
detached point (Algorithm 2 of the paper; the residual is in gradient units, so the point is
``w - detach * eta_t * e_k`` exactly as for GMC+), but the momentum is applied after aggregation, so it
stays dense under a sparsifier such as RBGS while GMC's global momentum is the last (sparse) aggregate.
This combination is not in the paper; it is an option.

Algorithm 4, GMC with the learning rate inside the residual (parameter units)::

    u'_k    = e'_k + eta_t (g_k + wd * w_t) + beta * (w_{t-1} - w_t)
    send C(u'_k);  e'_k <- u'_k - C(u'_k)
    w_{t+1} = w_t - (1/K) sum_k C(u'_k)        # (w_{t-1} - w_t) is this aggregate, kept for the next step

At a constant learning rate ``e' = eta e`` and Algorithm 4 is GMC exactly (for positively homogeneous
compressors such as top-k and RBGS). Under learning-rate decay its residual, accumulated at older,
larger learning rates, enters the update with a larger coefficient than GMC's (GMC paper, Appendix A).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_gmc._arguments import check_float
from lightning_gmc.compressors import Compressor
from lightning_gmc.methods._common import add_momentum, apply_lr_inside_out, check_lr
from lightning_gmc.methods.base import BucketStep, GroupHyper, Message, Method, Term

__all__ = ["EFServerMomentum", "GMCLRInside"]


class EFServerMomentum(Method):
    """Algorithm 3 of the GMC paper (``method="ef_server_momentum"``): EF-SGD + momentum on the
    aggregate; with ``detach > 0``, "GMC+ with momentum on the aggregate".

    When to use: as the "naive sparse update + momentum" baseline (DGC's motivating example; the GMC
    paper's Fig. 7 ablation), and with ``detach > 0`` and RBGS as an alternative to GMC+ whose momentum
    is not itself sparsified (not in the paper; docs/algorithms.md 2.9). With the identity compressor
    it is SGD momentum. The momentum buffer is identical on every rank, since it only sees the
    aggregate.

    Args:
        compressor: any compressor.
        detach: coefficient ``lambda >= 0`` of the detached gradient point ``w - lambda * eta_t * e_k``
            (as GMC+'s). 0 (default) is Algorithm 3 exactly.

    Raises:
        ValueError: ``detach`` negative or not finite.
    """

    name = "ef_server_momentum"
    buffers = {"residual": "local", "momentum": "shared"}
    error_feedback = True

    def __init__(self, compressor: Compressor, detach: float = 0.0) -> None:
        super().__init__(compressor)
        if not check_float("detach", detach, "a finite number >= 0") >= 0:
            raise ValueError(
                f"detach must be a finite number >= 0 (0 = Algorithm 3, > 0 = gradient at the detached "
                f"point w - detach * lr * residual), got {detach}"
            )
        self.detach = float(detach)

    def encode(self, step: BucketStep) -> list[Message]:
        # p_k = e_k + g_k + wd x_k (x_k: the gradient point, the detached one when detach > 0);
        # send C(p_k); e_k <- p_k - C(p_k). The identity's p_k is staged in the gradient buffer.
        residual = step.buffer("residual")
        return [
            step.send_error_feedback(
                self.compressor, residual, step.grad, step.weight_decay(), staging=step.grad
            )
        ]

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        (mean,) = means
        momentum = step.buffer("momentum")
        add_momentum(step, momentum, mean)  # m_t = beta m_{t-1} + mean
        step.use_direction(momentum)

    def detach_scale(self, hyper: GroupHyper) -> float:
        return self.detach * hyper.lr  # the residual is in gradient units, as GMC+'s

    def describe(self) -> str:
        if self.detach == 0:
            return f"ef_server_momentum (Alg. 3) with {self.compressor.describe()}"
        return (
            f"ef_server_momentum (GMC+ with momentum on the aggregate, detach={self.detach:g}) "
            f"with {self.compressor.describe()}"
        )


class GMCLRInside(Method):
    """Algorithm 4 of the GMC paper (``method="gmc_lr_inside"``): GMC with the learning rate inside the
    residual.

    When to use: to reproduce the paper's Fig. 7 ablation of where the learning rate sits. It equals
    GMC at a constant learning rate and differs at every learning-rate change; GMC is the better choice
    under decay. The buffer ``last_update`` holds ``w_{t-1} - w_t`` (identical on every rank).
    """

    name = "gmc_lr_inside"
    buffers = {"residual": "local", "last_update": "shared"}
    error_feedback = True

    def encode(self, step: BucketStep) -> list[Message]:
        grad = step.grad
        step.add_weight_decay(grad)
        residual = step.buffer("residual")
        last_update = step.buffer("last_update")
        # u'_k = e'_k + eta_t (g_k + wd w_t) + beta (w_{t-1} - w_t); send C(u'_k); e'_k <- u'_k - C(u'_k).
        # The mean is w_t - w_{t+1}, kept for the next step: decoded straight into last_update, where
        # the identity's u'_k is staged (as GMC's in its momentum).
        lr_times_grad = Term(grad, lambda hyper: check_lr(self.name, hyper))
        beta_times_last = Term(last_update, lambda hyper: hyper.momentum)
        return [
            step.send_error_feedback(
                self.compressor,
                residual,
                lr_times_grad,
                beta_times_last,
                staging=last_update,
                decode_into=last_update,
            )
        ]

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        (mean,) = means
        last_update = step.buffer("last_update")
        if mean is not last_update:
            last_update.copy_(mean)  # w_t - w_{t+1} for the next step
        apply_lr_inside_out(self.name, step, mean)

    def describe(self) -> str:
        return f"gmc_lr_inside (Alg. 4) with {self.compressor.describe()}"
