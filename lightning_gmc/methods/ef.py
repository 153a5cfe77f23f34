"""EF: classic error feedback on gradients, with the user's optimizer in charge (``docs/algorithms.md`` 2.10).

Per worker k and step t, with the residual ``e_k`` in gradient units::

    p_k = e_k + g_k
    send C(p_k);  e_k <- p_k - C(p_k)
    g_t = (1/K) sum_j C(p_j)                  # handed to the optimizer as the gradient

and the optimizer (any ``torch.optim.Optimizer``: SGD with or without Nesterov momentum, Adam, AdamW,
...) steps on ``g_t`` with its own momentum, adaptive scaling, weight decay and schedule. This is the
error-feedback compressor of Seide et al. (2014, 1-bit SGD), Stich et al. (2018, sparsified SGD with
memory) and Karimireddy et al. (2019, EF-SGD) applied to the gradient, which is where torch's PowerSGD
hook (Vogels et al., 2019) keeps its error too; the optimizer never learns that the gradient was
compressed. Unlike GMC (the GMC paper, section 3), no momentum enters the compressed vector, so
compression errors are not corrected for momentum; in exchange the method composes with every
optimizer.

Weight decay is the optimizer's: coupled L2 (``SGD(weight_decay=...)``, ``Adam``) is added by the
optimizer to the aggregated gradient, decoupled decay (``AdamW``) to the parameters. Neither is
compressed.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_gmc.methods.base import BucketStep, Message, Method

__all__ = ["ErrorFeedback"]


class ErrorFeedback(Method):
    """Error feedback on the gradient, leaving the optimizer alone (``method="ef"``).

    When to use: with an optimizer other than heavy-ball SGD (Adam, AdamW, Nesterov SGD, LAMB, ...),
    e.g. for transformers. With ``torch.optim.SGD(momentum=...)``, GMC usually is the better choice:
    its residual also carries what the compressor dropped of the momentum.

    Args:
        compressor: any compressor (top-k, RBGS, random-k, quantizers; unbiased ones are scaled by
            ``1/(1+omega)`` unless ``ef_scaling=False``).
    """

    name = "ef"
    buffers = {"residual": "local"}
    error_feedback = True
    takes_over_optimizer = False

    def encode(self, step: BucketStep) -> list[Message]:
        # p_k = e_k + g_k; send C(p_k); e_k <- p_k - C(p_k). The identity's p_k is staged in the
        # gradient buffer, which is no longer needed.
        residual = step.buffer("residual")
        return [step.send_error_feedback(self.compressor, residual, step.grad, staging=step.grad)]

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        (mean,) = means
        # The optimizer's gradient: the mean stays in its buffer until this bucket's next exchange.
        step.use_direction(mean)
