"""DGC: deep gradient compression with momentum correction (Lin et al. 2018; ``docs/algorithms.md`` 2.4).

Per worker k and step t, in the order of the official code::

    g_k  = clip(grad_k, clip_norm * K^{-1/2})   # optional local clipping, per parameter (see below)
           (+ wd * w_t when weight_decay_mode="compressed")
    u_k  = beta * u_k + g_k                     # local momentum ("momentum correction")
    v_k  = v_k + u_k                            # local accumulation (the residual, gradient units)
    send C(v_k);  v_k <- v_k - C(v_k)
    if momentum_masking: u_k[selected] = 0      # momentum factor masking ("DGC w/ mfm")
    w_{t+1} = w_t - eta_t * (1/K) sum_k C(v_k)  (- eta_t * b_t with b_t = beta b_{t-1} + wd w_t
                                                 when weight_decay_mode="local")

The learning rate stays outside the accumulation, like GMC (``docs/algorithms.md`` 3.2). Remark 2 of
the GMC paper: with the identity compressor DGC without masking is DMSGD with local momentum (= SGD
momentum on the mean gradient), and DGC with masking resets ``u`` every step, so it is plain distributed SGD.

Deviations and choices, all documented options:

* **Local clipping is per parameter.** The DGC paper clips each worker's whole gradient to
  ``clip_norm * K^{-1/2}`` before accumulating. A DDP hook sees one bucket at a time, while the
  whole-model norm is known only after the last bucket, and waiting for it would serialize all
  communication behind the backward pass. The official DGC code applies its clipping callable per
  tensor inside the per-tensor hook, and PaddlePaddle's ``DGCMomentumOptimizer`` clips each parameter's
  gradient by ``clip_norm * num_trainers ** -0.5``; this implementation does the same (with
  ``torch.nn.utils.clip_grad_norm_``'s formula per parameter). Only the loss gradient is clipped, not
  the weight-decay term.
* **Weight decay** is coupled L2 inside the compressed vector by default (as for GMC); the
  official code's local, uncompressed weight decay with its own momentum buffer is
  ``weight_decay_mode="local"``.
* **Sparsity warm-up**: the DGC paper's exponential schedule uses densities 25 %, 6.25 %, 1.5625 %,
  0.4 % in epochs 0-3 and the target density from epoch 4 (the DGC *code*'s default ramp differs; this
  follows the paper). Warm-up densities never go below the target density. The GMC paper
  did not use warm-up, so it is off by default. The density is a pure function of the epoch the
  strategy reports at each epoch start, so a resumed run continues the schedule exactly.
* Every tensor is compressed (no dense 1-D tensors as in the DGC code), so that DGC and GMC
  are compared at the same RCC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_gmc._arguments import check_bool, check_float, describe_value
from lightning_gmc.compressors import Compressor, Identity, SparseCompressor
from lightning_gmc.methods._common import add_momentum, with_density
from lightning_gmc.methods.base import BucketStep, Message, Method

__all__ = ["DGC", "PAPER_SPARSITY_WARMUP", "WeightDecayMode"]

WeightDecayMode = Literal["compressed", "local"]

#: The DGC paper's warm-up densities for epochs 0-3 (sparsity 75 %, 93.75 %, 98.4375 %, 99.6 %); the
#: target density applies from epoch 4 on (99.9 % in the paper).
PAPER_SPARSITY_WARMUP: tuple[float, ...] = (0.25, 0.0625, 0.015625, 0.004)


class DGC(Method):
    """Deep gradient compression (``method="dgc"``), the GMC paper's "DGC (w/ mfm)" and "DGC (w/o mfm)".

    When to use: as the local-momentum top-k baseline of the GMC paper's Tables 1-2. DGC w/ mfm is
    smoother but, on non-IID data, much less accurate than w/o mfm (Table 2); GMC differs from DGC
    w/o mfm only in using the global instead of the local momentum.

    Args:
        compressor: the compressor of ``v_k`` (top-k / approximate top-k in the papers; any compressor
            works without masking).
        momentum_masking: zero the local momentum where ``v_k`` was sent (DGC's default and the paper's
            "w/ mfm"); False is "w/o mfm". Needs a sparsifier or the identity, whose selection is
            well defined.
        clip_norm: local gradient clipping threshold before it is scaled by ``K^{-1/2}`` (None: off, as
            in the GMC paper). Applied per parameter; see the module docstring.
        sparsity_warmup: False (default, as in the GMC paper), True for the DGC paper's schedule
            :data:`PAPER_SPARSITY_WARMUP`, or explicit densities for epochs 0, 1, ... (the target
            density applies after them). Needs a compressor with a density.
        weight_decay_mode: ``"compressed"`` (coupled L2 inside the compressed vector, default) or
            ``"local"`` (DGC code: uncompressed, with its own local momentum buffer).

    Raises:
        ValueError: masking with a compressor that has no selection, warm-up with one that has no
            density, a bad density, a negative clip norm or an unknown weight-decay mode.
    """

    name = "dgc"
    buffers = {"momentum": "local", "residual": "local"}
    error_feedback = True

    def __init__(
        self,
        compressor: Compressor,
        momentum_masking: bool = True,
        clip_norm: float | None = None,
        sparsity_warmup: bool | Sequence[float] = False,
        weight_decay_mode: WeightDecayMode = "compressed",
    ) -> None:
        super().__init__(compressor)
        check_bool("momentum_masking", momentum_masking)
        clip_norm = check_float("clip_norm", clip_norm, "a number > 0", optional=True)
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        if weight_decay_mode not in ("compressed", "local"):
            raise ValueError(f"weight_decay_mode must be 'compressed' or 'local', got {weight_decay_mode!r}")
        self.momentum_masking = bool(momentum_masking)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.weight_decay_mode: WeightDecayMode = weight_decay_mode
        if weight_decay_mode == "local":
            # The weight-decay momentum depends only on w_t, which is identical on every rank.
            self.buffers = {**type(self).buffers, "wd_momentum": "shared"}
        if sparsity_warmup is True:
            schedule: tuple[float, ...] = PAPER_SPARSITY_WARMUP
        elif sparsity_warmup is False or sparsity_warmup is None:
            schedule = ()
        elif isinstance(sparsity_warmup, list | tuple):
            valid = "a number in (0, 1]"
            schedule = tuple(check_float("a sparsity_warmup density", d, valid) for d in sparsity_warmup)
        else:
            got = describe_value(sparsity_warmup)
            raise TypeError(f"sparsity_warmup must be True, False or a list of densities, got {got}")
        base_density = getattr(compressor, "density", None)
        # Never sparser than the target: max(warm-up, target) per epoch.
        self.warmup_densities: tuple[float, ...] = tuple(
            max(d, base_density) if base_density is not None else d for d in schedule
        )
        # One compressor value per epoch of the schedule (equal densities share a plan).
        self._warmup: list[Compressor] = [
            with_density(compressor, d, "DGC sparsity warm-up") for d in self.warmup_densities
        ]
        if self.momentum_masking:
            for c in self.compressors():
                if not isinstance(c, SparseCompressor | Identity):
                    raise ValueError(
                        f"DGC momentum factor masking zeroes the momentum where the compressor selected "
                        f"coordinates, so it needs a sparsifier ('topk', 'topk_approx', 'randk', 'rbgs') or "
                        f"'none'; {c.describe()!r} selects none. Use momentum_masking=False with it."
                    )
        self._active: Compressor = self._warmup[0] if self._warmup else compressor

    def compressors(self) -> list[Compressor]:
        return [self.compressor, *(c for c in self._warmup if c != self.compressor)]

    @property
    def active_compressor(self) -> Compressor:
        """The compressor of the current epoch (differs from ``compressor`` during warm-up)."""
        return self._active

    def on_epoch_start(self, epoch: int) -> None:
        self._active = self._warmup[epoch] if 0 <= epoch < len(self._warmup) else self.compressor

    def encode(self, step: BucketStep) -> list[Message]:
        grad = step.grad
        if self.clip_norm is not None:
            _clip_per_parameter(step, grad, self.clip_norm * step.world_size**-0.5)
        if self.weight_decay_mode == "compressed":
            step.add_weight_decay(grad)
        momentum = step.buffer("momentum")
        add_momentum(step, momentum, grad)  # u = beta u + g
        # v = v + u; send C(v); v <- v - C(v). The identity's v is staged in the gradient buffer.
        accumulation = step.buffer("residual")
        message = step.send_error_feedback(self._active, accumulation, momentum, staging=grad)
        if self.momentum_masking:
            if isinstance(self._active, Identity):
                momentum.zero_()  # everything was sent
            else:
                momentum.index_fill_(0, message.payload.context["index"], 0.0)
        return [message]

    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        (mean,) = means
        if self.weight_decay_mode == "local":
            wd_momentum = step.buffer("wd_momentum")
            for sl, hyper in step.runs():
                wd_momentum[sl].mul_(hyper.momentum).add_(step.params()[sl], alpha=hyper.weight_decay)
            torch.add(mean, wd_momentum, out=step.out)  # one pass, as copy_ + add_
        else:
            # The mean stays in its buffer until this bucket's next exchange: no copy.
            step.use_direction(mean)

    def describe(self) -> str:
        # Stable across epochs (the checkpoint compares it on resume): the target compressor, not the
        # warm-up one of the moment.
        densities = "/".join(f"{d:g}" for d in self.warmup_densities)
        warmup = f", sparsity_warmup={densities}" if self._warmup else ""
        clip = f", clip_norm={self.clip_norm:g}" if self.clip_norm is not None else ""
        wd = f", weight_decay_mode={self.weight_decay_mode}"
        options = f"momentum_masking={self.momentum_masking}{clip}{warmup}{wd}"
        return f"dgc ({options}) with {self.compressor.describe()}"


def _clip_per_parameter(step: BucketStep, grad: Tensor, max_norm: float) -> None:
    """``clip_grad_norm_(g_p, max_norm)`` for every parameter's slice of the bucket, without host syncs."""
    views = [grad[seg.offset : seg.offset + seg.numel] for seg in step.bucket.segments]
    norms = torch._foreach_norm(views)
    for view, norm in zip(views, norms, strict=True):
        # Same formula as torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).
        view.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
