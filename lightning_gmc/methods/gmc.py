"""GMC and GMC+ (GMC paper §3 and §4, Algorithms 1 and 2; ``docs/algorithms.md`` 2.2-2.3).

Per worker k and step t (all-reduce form of Algorithm 1, GMC paper §3.1)::

    u_k   = e_k + g_k + wd * x_k + beta * c_t * m_{t-1}
    e_k   = u_k - C(u_k)
    m_t   = (1/K) sum_j C(u_j)            # identical on every rank
    w_{t+1} = w_t - eta_t * m_t           # the optimizer's own (momentum-free) SGD step

``g_k`` is evaluated at ``x_k = w_t`` (GMC) or at the detached point ``x_k = w_t - lambda * eta_t *
e_k`` (GMC+, ``detach = lambda > 0``). ``c_t`` is 1 under the ``"prev"`` learning-rate convention,
where ``m_{t-1} = (w_{t-1} - w_t) / eta_{t-1}`` and GMC with ``C = I`` equals
``torch.optim.SGD(momentum=beta)`` exactly; it is ``eta_{t-1} / eta_t`` under ``"cur"``, the
heavy-ball form ``beta (w_{t-1} - w_t) / eta_t`` (``docs/algorithms.md`` 3.1). The two differ only at
steps where the learning rate changes.

The residual is in gradient units and the learning rate stays outside it: it is never rescaled when
the schedule changes the learning rate (rescaling would turn GMC into the
GMC paper's Appendix A Algorithm 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from lightning_gmc._arguments import check_float
from lightning_gmc.compressors import Compressor
from lightning_gmc.methods.base import BucketStep, GroupHyper, Message, Method, Term

__all__ = ["GMC", "MomentumConvention"]

MomentumConvention = Literal["prev", "cur"]


class GMC(Method):
    """Global momentum compression; GMC+ when ``detach > 0``.

    Args:
        compressor: any compressor (top-k in the GMC paper; RBGS for GMC+).
        detach: GMC+'s detach coefficient ``lambda >= 0``; the paper's choice is 0.5 with RBGS.
            0 gives GMC exactly.
        momentum_lr_convention: ``"prev"`` (default, PyTorch SGD semantics) or ``"cur"``
            (heavy-ball form); see the module docstring. Not fixed by the paper, hence an option.
    """

    name = "gmc"
    buffers = {"residual": "local", "momentum": "shared"}
    error_feedback = True

    def __init__(
        self,
        compressor: Compressor,
        detach: float = 0.0,
        momentum_lr_convention: MomentumConvention = "prev",
    ) -> None:
        super().__init__(compressor)
        if not check_float("detach", detach, "a finite number >= 0 (0 = GMC, > 0 = GMC+)") >= 0:
            raise ValueError(f"detach must be >= 0 (0 = GMC, > 0 = GMC+), got {detach}")
        if momentum_lr_convention not in ("prev", "cur"):
            raise ValueError(
                f"momentum_lr_convention must be 'prev' or 'cur', got {momentum_lr_convention!r}"
            )
        self.detach = float(detach)
        self.momentum_lr_convention: MomentumConvention = momentum_lr_convention

    def encode(self, step: BucketStep) -> list[Message]:
        residual = step.buffer("residual")
        momentum = step.buffer("momentum")
        # u_k = e_k + g_k + wd x_k + beta c_t m_{t-1}; send C(u_k); e_k <- u_k - C(u_k). m_t, the mean
        # over workers, is decoded straight into the momentum buffer, over which the identity's u_k is
        # staged (m_{t-1} is not needed once u_k is formed): nothing is copied.
        momentum_term = Term(momentum, self._momentum_coefficient)
        return [
            step.send_error_feedback(
                self.compressor,
                residual,
                step.grad,
                step.weight_decay(),
                momentum_term,
                staging=momentum,
                decode_into=momentum,
            )
        ]

    def _momentum_coefficient(self, hyper: GroupHyper) -> float:
        """``beta * c_t``: ``c_t = eta_{t-1} / eta_t`` under ``"cur"``, 1 under ``"prev"``."""
        scale = hyper.prev_lr / hyper.lr if self.momentum_lr_convention == "cur" else 1.0
        return hyper.momentum * scale

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        (mean,) = means
        momentum = step.bucket.buffers["momentum"]
        if mean is not momentum:
            momentum.copy_(mean)
        step.use_direction(momentum)  # the direction is m_t: no copy into the gradient bucket

    def detach_scale(self, hyper: GroupHyper) -> float:
        return self.detach * hyper.lr

    def describe(self) -> str:
        label = "gmc" if self.detach == 0 else f"gmc+ (detach={self.detach:g})"
        return (
            f"{label} with {self.compressor.describe()}, momentum_lr_convention={self.momentum_lr_convention}"
        )
