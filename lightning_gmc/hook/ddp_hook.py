"""The DDP communication hook: one method step on one gradient bucket."""

# No `from __future__ import annotations`: DDP's register_comm_hook checks the annotations of
# gmc_hook against the real dist.GradBucket and torch.futures.Future types.

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from lightning_gmc.hook.hierarchy import NodeGroups
from lightning_gmc.hook.state import GMCHookState
from lightning_gmc.methods import BucketState, BucketStep, GroupHyper

__all__ = ["gmc_hook"]


def _read_params(params: list[Tensor]) -> Callable[[Tensor], None]:
    def read(out: Tensor) -> None:
        torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params], out=out)

    return read


def _screened_gradient(state: GMCHookState, bucket: dist.GradBucket) -> tuple[list[Tensor], Tensor, Tensor]:
    """The bucket's parameters, its buffer, and the fp32 gradient the method reads (the buffer itself
    for an fp32 bucket, a copy otherwise) after the ``nonfinite`` policy."""
    params = bucket.parameters()
    buffer = bucket.buffer()
    grad = buffer if buffer.dtype == torch.float32 else buffer.to(torch.float32)
    _screen_nonfinite(state, grad, len(params))
    return params, buffer, grad


def _method_step(
    state: GMCHookState,
    bucket_state: BucketState,
    grad: Tensor,
    params: list[Tensor],
    hypers: list[GroupHyper],
    bucket_index: int,
) -> BucketStep:
    """This rank's method step on ``grad`` (the parameters ``params``, in place: ``out`` is ``grad``)."""
    worker = state.worker
    assert worker is not None
    return BucketStep(
        bucket=bucket_state,
        grad=grad,
        out=grad,
        hypers=hypers,
        step=state.step,
        rng=worker.rng,
        world_size=state.exchange.world_size,
        read_params=_read_params(params),
        agree_support=state.support.bind(state.step, worker.rank, bucket_index),
    )


def _screen_nonfinite(state: GMCHookState, grad: Tensor, num_params: int) -> None:
    """Apply the ``nonfinite`` policy to this rank's bucket gradient (in place)."""
    # One reduction pass: an inf or NaN anywhere makes the min or the max non-finite (NaN propagates
    # through both); isfinite(grad).all() would allocate gradient-sized temporaries.
    low, high = torch.aminmax(grad)
    skipped = torch.isfinite(low).logical_and(torch.isfinite(high)).logical_not()
    if state.nonfinite == "raise":
        if bool(skipped):
            raise FloatingPointError(
                f"non-finite gradient in a bucket of {num_params} parameters at step {state.step} on "
                f"{state.exchange.describe_rank()}"
            )
        return
    if grad.device.type == "cpu":
        if bool(skipped):  # no device to keep asynchronous: skip the fill pass when all is finite
            grad.zero_()
    else:
        grad.masked_fill_(skipped, 0.0)  # drops the whole bucket contribution, no host sync
    state.metrics.count_nonfinite(skipped)


def gmc_hook(state: GMCHookState, bucket: dist.GradBucket) -> Future[Tensor]:
    """DDP communication hook running ``state.method`` with its compressor on one gradient bucket.

    Issues exactly one collective per message (one per bucket for every method except at CSER-style
    reset steps) in the hook body, preceded by the support's broadcast for ``topk_shared``; only
    local decoding runs in the future's callback.
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
    if state.node_groups is not None:
        return _hierarchical_bucket(state, bucket, state.node_groups)
    hypers = state.begin_step()
    params, buffer, grad = _screened_gradient(state, bucket)
    bucket_state = state.worker.bucket(state.binding.parameter_indices(params))
    step = _method_step(state, bucket_state, grad, params, hypers, bucket.index())
    messages = state.method.encode(step)
    future = state.exchange.start(
        [messages], [bucket_state], state.step, bucket.index(), dense_element_size=buffer.element_size()
    )
    if bucket.is_last():
        state.end_step()

    def finish(fut: Future[list[list[Tensor]]]) -> Tensor:
        state.method.decode(step, fut.value()[0])
        direction = step.direction()
        if direction is buffer:
            return buffer
        if buffer.dtype == torch.float32:
            # A state buffer that holds the direction (e.g. GMC's momentum): DDP copies the hook's
            # result into the parameters' gradients, so handing it over saves a copy into the bucket.
            # The method leaves it unchanged until this bucket's next encode, after that copy.
            return direction
        buffer.copy_(direction)  # a bf16 bucket gets the direction rounded, as before
        return buffer

    return future.then(finish)


def _hierarchical_bucket(state: GMCHookState, bucket: dist.GradBucket, groups: NodeGroups) -> Future[Tensor]:
    """One bucket under ``hierarchy="node"`` (see :mod:`~lightning_gmc.hook.hierarchy`).

    The node mean and the inter-node exchange are waited for in the hook body: every collective is
    then issued in the caller's thread, in the same order on every rank (a collective issued from a
    future's callback would run on the back-end's completion thread). Only the share-back all-reduce
    is left in flight; its callback copies the result, locally.
    """
    worker = state.worker
    assert worker is not None
    hypers = state.begin_step()
    params, buffer, grad = _screened_gradient(state, bucket)
    layout = state.node_layout(state.binding.parameter_indices(params))
    ranks_per_node = groups.topology.ranks_per_node
    state.intra_traffic.record_allreduce(grad.numel() * grad.element_size(), ranks_per_node)
    dist.all_reduce(grad, group=groups.intra)
    grad.div_(ranks_per_node)  # the node's mean gradient: what the node's one worker computes with
    layout.share.zero_()
    if layout.owned_indices:
        bucket_state = worker.bucket(layout.owned_indices)
        owned = bucket_state.workspace("node_grad")
        layout.gather(grad, owned)
        owned_params = [params[pos] for pos in layout.owned_positions]
        step = _method_step(state, bucket_state, owned, owned_params, hypers, bucket.index())
        messages = state.method.encode(step)
        means = state.exchange.start([messages], [bucket_state], state.step, bucket.index()).wait()
        state.method.decode(step, means[0])
        layout.scatter(step.direction(), 0)  # owned, or the state buffer holding the direction
        for section, name in enumerate(state.method.buffers, start=1):
            layout.scatter(bucket_state.buffers[name], section)
    state.intra_traffic.record_allreduce(layout.share.numel() * 4, ranks_per_node)
    work = dist.all_reduce(layout.share, group=groups.intra, async_op=True)
    assert work is not None
    if bucket.is_last():
        state.end_step()

    def finish(fut: Future[list[Tensor]]) -> Tensor:
        fut.value()  # re-raises a failed share-back
        # Every rank of the node, owners included, takes the summed buffer: identical state everywhere.
        buffer.copy_(layout.section(0))
        for section, name in enumerate(state.method.buffers, start=1):
            summed, per_param = layout.section(section), worker.tensors[name]
            for index, offset, numel in zip(layout.param_indices, layout.offsets, layout.numels, strict=True):
                per_param[index].copy_(summed[offset : offset + numel])
        return buffer

    return work.get_future().then(finish)
