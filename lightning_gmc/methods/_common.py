"""Small helpers shared by the baseline methods (not part of the public API)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lightning_gmc.compressors import Compressor
from lightning_gmc.methods.base import BucketStep, GroupHyper

__all__ = [
    "add_momentum",
    "apply_lr_inside_out",
    "check_lr",
    "with_density",
]


def check_lr(method: str, hyper: GroupHyper) -> float:
    """The step's learning rate, which a learning-rate-inside method divides its update by.

    Raises:
        ValueError: ``lr <= 0``. These methods compute the parameter change ``delta`` themselves and
            hand the optimizer ``delta / lr``; with ``lr = 0`` that is undefined (and the optimizer
            could not apply a non-zero model change such as CSER's reset anyway).
    """
    if not hyper.lr > 0.0:
        raise ValueError(
            f"method {method!r} keeps the learning rate inside its residual and needs lr > 0 at every "
            f"step, got lr={hyper.lr}; use a schedule with a positive minimum (e.g. eta_min > 0)"
        )
    return hyper.lr


def add_momentum(step: BucketStep, buffer: Tensor, increment: Tensor) -> None:
    """``buffer <- beta * buffer + increment`` per param group (heavy-ball, no dampening), in one pass:
    ``torch.add(increment, buffer, alpha=beta)`` rounds once (a fused multiply-add), where
    ``torch.optim.SGD``'s ``mul_`` + ``add_`` reads and writes the buffer twice and rounds twice."""
    for sl, hyper in step.runs():
        torch.add(increment[sl], buffer[sl], alpha=hyper.momentum, out=buffer[sl])


def apply_lr_inside_out(method: str, step: BucketStep, delta: Tensor) -> None:
    """``step.out = delta / lr`` per group, so the optimizer's ``w - lr * out`` applies ``w - delta``."""
    for sl, hyper in step.runs():
        torch.div(delta[sl], check_lr(method, hyper), out=step.out[sl])  # one pass, as copy_ + div_


def with_density(compressor: Compressor, density: float, what: str) -> Compressor:
    """``compressor`` with every option kept but ``density`` (``dataclasses.replace``): a new value,
    equal to ``compressor`` when the density is unchanged.

    Raises:
        ValueError: the compressor has no ``density`` (quantizers) or the density is outside (0, 1].
    """
    if not dataclasses.is_dataclass(compressor) or "density" not in {
        f.name for f in dataclasses.fields(compressor) if f.init
    }:
        raise ValueError(
            f"{what} needs a compressor with a density (a sparsifier such as 'topk', 'topk_approx', "
            f"'randk', 'rbgs'); {compressor.describe()!r} has none"
        )
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{what}: density must be in (0, 1], got {density}")
    return dataclasses.replace(compressor, density=density)
