"""EF21: compressed gradient differences, with the user's optimizer in charge (``docs/algorithms.md`` 2.11).

Richtárik, Sokolov and Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically
Faster Error Feedback" (NeurIPS 2021), Algorithm 1. Per worker k and step t, with the worker's
gradient estimate ``h_k`` and the aggregate ``h = mean_k h_k`` (both zero at ``t = 0``)::

    c_k = C(g_k - h_k)
    h_k <- h_k + c_k;   send c_k
    h   <- h + (1/K) sum_j c_j                # shared: identical on every rank
    the optimizer steps on h

Instead of feeding back what the compressor dropped (``ef``), every worker compresses the change of
its gradient against an estimate that the receivers track too, so the vector the optimizer sees is a
dense running estimate of the mean gradient rather than a sparse vector with occasional large
accumulated entries. That is what makes it a candidate for adaptive optimizers, whose second-moment
estimate reacts to such entries. Like ``ef`` it leaves the optimizer alone.

Not from the paper: the zero initialisation (the paper allows any ``h_k^0``; zero needs no dense
first step); a restart of the local estimates (a resume on another number of workers) that sets
every ``h_k`` to the kept ``h``, which keeps ``h = mean_k h_k``; and the non-finite policy's "skip",
which hands the method a zero gradient and so moves that rank's estimate toward zero for one step
instead of leaving it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gmc.methods.base import BucketStep, Message, Method, Undelivered

__all__ = ["EF21"]


class EF21(Method):
    """EF21 (``method="ef21"``): compress gradient differences; any optimizer steps on the estimate.

    When to use: as ``ef``, with an optimizer other than heavy-ball SGD, in particular adaptive ones
    (Adam, AdamW); see ``docs/algorithms.md`` 2.11 for how the two compare.

    Args:
        compressor: any compressor (contractive ones as analysed by the paper: top-k, RBGS; unbiased
            ones are scaled by ``1/(1+omega)`` unless ``ef_scaling=False``).
    """

    name = "ef21"
    buffers = {"estimate": "local", "aggregate": "shared"}
    #: h = mean_k h_k: every worker adds its c_k to h_k and the mean of all c_j to h, so the invariant
    #: holds from the zero start on. A reset of the local estimates sets every h_k to h (the
    #: optimizer keeps its gradient estimate); zeroing h_k alone would leave h - mean_k h_k = h in the
    #: direction forever.
    mean_of_local = {"aggregate": "estimate"}
    error_feedback = True
    takes_over_optimizer = False

    def encode(self, step: BucketStep) -> list[Message]:
        estimate = step.buffer("estimate")
        difference = step.bucket.workspace("ef21_difference")
        torch.sub(step.grad, estimate, out=difference)  # g_k - h_k
        message = step.compress(self.compressor, difference)
        # h_k <- h_k + c_k, decoded straight into the estimate (what every receiver adds for this rank)
        message.compressor.decompress_add(message.payload, message.plan, estimate)
        return [message]

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        (mean,) = means
        aggregate = step.buffer("aggregate")
        aggregate.add_(mean)
        step.use_direction(aggregate)  # the optimizer's gradient, handed over without a copy

    def absorb_undelivered(self, step: BucketStep, slot: int, undelivered: Undelivered) -> None:
        # h received round(S)/K, the workers added S/K to their estimates on average: the owner of each
        # chunk takes back the remainder, so sum_k h_k moves by round(S) and h = mean_k h_k holds.
        undelivered.add_to(step.buffer("estimate"), sign=-1.0)
