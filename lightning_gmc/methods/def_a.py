"""DEF-A: detached error feedback with local momentum (Xu & Huang 2022; ``docs/algorithms.md`` 2.6).

Follows the official ``optimizers/Def.py`` (§9.1), which is what the GMC paper ran as "DEF-A". Per
worker k and step t, with the residual ``e_k`` in parameter units (learning rate inside)::

    y_k   = x_t - c * e_k                         # detached gradient point (c = ``detach``)
    g_k   = grad f(y_k) + wd * y_k                # weight decay at the detached point
    m_k   = beta * m_k + g_k                      # LOCAL momentum, never reset
    p_k   = e_k + eta_t * m_k
    send C(p_k);  e_k <- p_k - C(p_k)
    x_{t+1} = x_t - (1/K) sum_j C(p_j)

``c = 0`` is error feedback with local momentum (gradient at ``x_t``); ``c = 1`` is step-ahead EF.
The paper's (and the DEF scripts') coefficient is 0.3.

Evaluation model (not fixed by the paper, hence an option): the official code evaluates the
"virtual SGD iterate" ``x_t - (1/K) sum_k e_k`` (``evaluation="x_t_minus_mean_error"``, the default
here, costs one all-reduce of the residuals per validation/test/predict/checkpoint); ``evaluation=
"x_t"`` uses the training model ``x_t``, as for GMC/GMC+. With the virtual iterate the checkpoint's
weights are that model, and every rank's ``x_t`` travels in the GMC block so training resumes exactly.

Not implemented: the code's ``period`` option (local steps between communications), which is 1 in
every shipped script.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from lightning_gmc._arguments import check_float
from lightning_gmc.compressors import Compressor
from lightning_gmc.methods._common import add_momentum, apply_lr_inside_out, check_lr
from lightning_gmc.methods.base import BucketStep, GroupHyper, Message, Method, Term

__all__ = ["DEFA", "DEFEvaluation"]

DEFEvaluation = Literal["x_t_minus_mean_error", "x_t"]


class DEFA(Method):
    """Detached error feedback with local momentum (``method="def_a"``).

    When to use: as the GMC paper's DEF-A baseline (Tables 1-4), in particular against GMC+ with RBGS
    (Table 3/4): GMC+ is DEF-A with the local momentum replaced by the global one. With RBGS both
    "almost fail to converge" at coefficient 0, so keep ``detach > 0``.

    Args:
        compressor: any compressor (RBGS in the DEF scripts, top-k in the GMC paper's Tables 1-2).
        detach: the detach coefficient ``c >= 0`` (0.3 as suggested by Xu & Huang and used by the GMC
            paper). ``GMCStrategy(method="def_a", detach=...)`` sets it.
        evaluation: which model validation/test/predict and checkpoints use:
            ``"x_t_minus_mean_error"`` (official code, default) or ``"x_t"``.

    Raises:
        ValueError: negative ``detach`` or an unknown ``evaluation``.
    """

    name = "def_a"
    buffers = {"residual": "local", "momentum": "local"}
    error_feedback = True

    def __init__(
        self, compressor: Compressor, detach: float = 0.3, evaluation: DEFEvaluation = "x_t_minus_mean_error"
    ) -> None:
        super().__init__(compressor)
        if not check_float("detach", detach, "a finite number >= 0 (DEF's coefficient c)") >= 0:
            raise ValueError(f"detach (DEF's coefficient c) must be >= 0, got {detach}")
        if evaluation not in ("x_t_minus_mean_error", "x_t"):
            raise ValueError(f"evaluation must be 'x_t_minus_mean_error' or 'x_t', got {evaluation!r}")
        self.detach = float(detach)
        self.evaluation: DEFEvaluation = evaluation
        virtual = evaluation == "x_t_minus_mean_error"
        self.evaluation_point = "params_minus_mean_residual" if virtual else "params"

    def encode(self, step: BucketStep) -> list[Message]:
        grad = step.grad
        step.add_weight_decay(grad)  # step.params() is the detached point y_k
        momentum = step.buffer("momentum")
        add_momentum(step, momentum, grad)
        # p_k = e_k + eta_t m_k; send C(p_k); e_k <- p_k - C(p_k). The identity's p_k is staged in
        # the gradient buffer.
        residual = step.buffer("residual")
        lr_times_momentum = Term(momentum, lambda hyper: check_lr(self.name, hyper))
        return [step.send_error_feedback(self.compressor, residual, lr_times_momentum, staging=grad)]

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        (mean,) = means
        apply_lr_inside_out(self.name, step, mean)  # x_{t+1} = x_t - mean

    def detach_scale(self, hyper: GroupHyper) -> float:
        return self.detach  # the residual is already in parameter units

    def evaluation_residual_scale(self, hyper: GroupHyper) -> float:
        return 1.0

    def describe(self) -> str:
        options = f"detach={self.detach:g}, evaluation={self.evaluation}"
        return f"def_a ({options}) with {self.compressor.describe()}"
