"""DMSGD: dense distributed momentum SGD through the GMC hook (GMC paper §2.3; ``docs/algorithms.md`` 2.1).

Per step every worker sends its full gradient (plus coupled L2), the hook all-reduces the mean and
every rank applies heavy-ball momentum to it::

    g_t     = (1/K) sum_k (g_k + wd * w_t)
    m_t     = beta * m_{t-1} + g_t          (m_{-1} = 0)
    w_{t+1} = w_t - eta_t * m_t

This is ``torch.optim.SGD(momentum=beta, dampening=0, weight_decay=wd)`` on the mean gradient, i.e. plain
DDP + SGD, and without compression also DMSGD with local momentum (eq. 6; the two coincide when nothing
is compressed). It exists so that the uncompressed reference runs through exactly the same hook,
metrics (RCC = 1), logging and checkpointing as the compressed methods it is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_gmc.compressors import Compressor, Identity
from lightning_gmc.methods._common import add_momentum
from lightning_gmc.methods.base import BucketStep, Message, Method

__all__ = ["DMSGD"]


class DMSGD(Method):
    """Dense momentum SGD, the no-compression reference (``method="dmsgd"``).

    When to use: as the accuracy and communication baseline every compressed method is measured
    against (RCC = 1 by definition). Numerically it equals DDP with ``torch.optim.SGD``.

    Args:
        compressor: must be the identity (``"none"``, the default when the strategy or simulator is
            not given a compressor): this method is dense by definition.

    Raises:
        ValueError: any other compressor.
    """

    name = "dmsgd"
    buffers = {"momentum": "shared"}
    error_feedback = False
    default_compressor = "none"

    def __init__(self, compressor: Compressor) -> None:
        if not isinstance(compressor, Identity):
            raise ValueError(
                f"method 'dmsgd' is dense momentum SGD and sends uncompressed gradients; it takes only the "
                f"identity compressor ('none', its default), got {compressor.describe()!r}. For compressed "
                f"baselines use 'dgc', 'ef_server_momentum', 'cser' or 'def_a'."
            )
        super().__init__(compressor)

    def encode(self, step: BucketStep) -> list[Message]:
        step.add_weight_decay(step.grad)  # coupled L2, as torch.optim.SGD(weight_decay=...) does
        # The gradient buffer is sent as is and the exchange sums and decodes into it in place.
        return [step.send_as_is(self.compressor, step.grad, decode_into=step.grad)]

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        (mean,) = means
        momentum = step.buffer("momentum")
        add_momentum(step, momentum, mean)
        step.use_direction(momentum)  # no copy into the gradient bucket

    def describe(self) -> str:
        return "dmsgd (dense)"
