"""The DDP communication hook: one method step on one gradient bucket."""

# No `from __future__ import annotations`: DDP's register_comm_hook checks the annotations of
# gmc_hook against the real dist.GradBucket and torch.futures.Future types.

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from lightning_gmc.hook.reducer import BucketWork
from lightning_gmc.hook.refusal import failed_future
from lightning_gmc.hook.state import GMCHookState
from lightning_gmc.methods import GroupHyper
from lightning_gmc.transport import CollectiveFailure, WireOverflow

__all__ = ["gmc_hook"]


def _screen_nonfinite(state: GMCHookState, grad: Tensor, bucket_index: int, num_params: int) -> None:
    """Apply the ``nonfinite`` policy to this rank's bucket gradient (in place)."""
    # One reduction pass: an inf or NaN anywhere makes the min or the max non-finite (NaN propagates
    # through both); isfinite(grad).all() would allocate gradient-sized temporaries.
    low, high = torch.aminmax(grad)
    skipped = torch.isfinite(low).logical_and(torch.isfinite(high)).logical_not()
    if state.nonfinite == "raise":
        state.reducer.check_finite(skipped, bucket_index, num_params, state.step)
        return
    if grad.device.type == "cpu":
        if bool(skipped):  # no device to keep asynchronous: skip the fill pass when all is finite
            grad.zero_()
    else:
        grad.masked_fill_(skipped, 0.0)  # drops the whole bucket contribution, no host sync
    state.metrics.count_nonfinite(skipped)


def gmc_hook(state: GMCHookState, bucket: dist.GradBucket) -> Future[Tensor]:
    """DDP communication hook running ``state.method`` with its compressor on one gradient bucket.

    Screens the bucket's gradient (the ``nonfinite`` policy) and hands it to ``state.reducer``
    (:mod:`~lightning_gmc.hook.reducer`), which issues every collective of the bucket in this call, in
    bucket order, the same on every rank; only local decoding runs in the returned future's callbacks.
    """
    if not isinstance(bucket, dist.GradBucket):
        raise TypeError(
            "gmc_hook received a (grad, param) tuple instead of a GradBucket: compiled autograd's "
            "python_reducer mode is not supported; disable torch._dynamo.config.optimize_ddp or "
            "compiled autograd"
        )
    if state.worker is None:
        raise RuntimeError("GMCHookState.attach(model, optimizer) must be called before the first backward")
    state.hook_calls += 1
    state.refusal.begin_bucket(first_of_step=not state.clock.in_step)
    hypers = state.begin_step()
    if state.refusal.error is not None:
        # An earlier bucket of this step overflowed fp16 on every rank: the step is refused, nothing
        # of it is sent or kept (hook/refusal.py).
        future = failed_future(state.refusal.error)
    else:
        future = _reduce(state, bucket, hypers)
    if bucket.is_last():
        state.end_step()
    return future


def _reduce(state: GMCHookState, bucket: dist.GradBucket, hypers: list[GroupHyper]) -> Future[Tensor]:
    params = bucket.parameters()
    buffer = bucket.buffer()
    grad = buffer if buffer.dtype == torch.float32 else buffer.to(torch.float32)
    _screen_nonfinite(state, grad, bucket.index(), len(params))
    work = BucketWork(
        index=bucket.index(),
        params=params,
        param_indices=state.binding.parameter_indices(params),
        buffer=buffer,
        grad=grad,
        hypers=hypers,
        step=state.step,
    )
    try:
        return state.reducer.reduce(work)
    except WireOverflow as err:
        return state.refusal.refuse(err)
    except CollectiveFailure as err:  # raised in this thread (a support broadcast, a waited phase)
        state.note_failure(err)
        raise
