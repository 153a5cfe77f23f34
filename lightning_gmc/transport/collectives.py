"""The collective protocol the exchange runs on, and its two back-ends.

A back-end serves the *local workers* of one process: one for torch.distributed (a rank), K for
the in-process simulation. Each collective takes one tensor per local worker, is issued when called
(in the caller's thread, so every rank issues collectives in the same order) and returns a future
that completes once the result is in place. A collective's result is the same on every worker, so
a process holds it once: in ``tensors[0]`` (all-reduce, broadcast) or in ``output`` (all-gather).

Only operations NCCL also provides are used: ``all_reduce`` (sum), ``all_gather_into_tensor`` of
buffers of equal size, ``all_to_all_single`` and ``broadcast``.

:meth:`Collectives.reduce_scatter_sum` adds the workers' contributions in rank order, with fp32
accumulation, in both back-ends: the sum then does not depend on the chunking, the ring or the number
of workers, and a run equals its in-process simulation bit for bit. (A ring reduction, gloo's
``all_reduce`` and ``reduce_scatter`` included, adds each chunk in another order, and 16-bit inputs
would be rounded at every hop.) On the wire it moves what a ring reduce-scatter moves: ``(K-1)/K`` of
each worker's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

__all__ = ["Collectives", "InProcessCollectives", "TorchCollectives"]

# torch 2.14 renamed all_gather_into_tensor; keep working on the older releases we support.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@runtime_checkable
class Collectives(Protocol):
    """Collectives over ``world_size`` workers, ``len(local_ranks)`` of which live in this process."""

    @property
    def world_size(self) -> int:
        """Number of workers K taking part in every collective."""
        ...

    @property
    def local_ranks(self) -> Sequence[int]:
        """Ranks of this process's workers, in the order collectives take their tensors."""
        ...

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> Future[Tensor]:
        """Sum every worker's tensor; the future yields the sum, written into ``tensors[0]``."""
        ...

    def all_gather(self, inputs: Sequence[Tensor], output: Tensor) -> Future[Tensor]:
        """Gather every worker's buffer (all of one size ``n`` and dtype) into ``output`` (``K n``
        elements, in rank order); the future yields ``output``."""
        ...

    def reduce_scatter_sum(
        self, inputs: Sequence[Tensor], outputs: Sequence[Tensor], scratch: Tensor | None = None
    ) -> Future[Tensor]:
        """Every worker's input holds ``K`` chunks of ``S`` elements; worker ``r``'s output (``S``
        elements, fp32) receives the sum over all workers of their chunk ``r``, added in rank order in
        fp32 whatever the inputs' dtype (module docstring). ``scratch`` (``K S`` elements of the
        inputs' dtype) is a receive buffer the back-end may use; None allocates one. The future
        yields ``outputs[0]``."""
        ...

    def broadcast(self, tensors: Sequence[Tensor], src: int) -> Future[Tensor]:
        """Give ``tensors[0]`` the values of worker ``src``'s tensor (``src`` is a rank of this
        group; when ``src`` is local, its own tensor is the one sent)."""
        ...


def _done(value: Tensor) -> Future[Tensor]:
    future: Future[Tensor] = Future()
    future.set_result(value)
    return future


def _sum_chunks_in_rank_order(received: Tensor, world_size: int, out: Tensor) -> Tensor:
    """``out = ((c_0 + c_1) + c_2) + ...`` over the ``world_size`` equal chunks of ``received``, in fp32
    (``out``'s dtype). The one place both back-ends add contributions: identical bits in each."""
    chunk = out.numel()
    if received.numel() != world_size * chunk:
        raise ValueError(
            f"reduce_scatter_sum: {received.numel()} elements received for {world_size} chunks of {chunk}"
        )
    if out.dtype != torch.float32:
        raise TypeError(f"reduce_scatter_sum accumulates in fp32; the output is {out.dtype}")
    out.copy_(received[:chunk])
    for rank in range(1, world_size):
        out.add_(received[rank * chunk : (rank + 1) * chunk])
    return out


def _first(work: dist.Work, value: Tensor) -> Future[Tensor]:
    def check(future: Future[list[Tensor]]) -> Tensor:
        future.value()  # re-raises a failed collective's error into the returned future
        return value

    return work.get_future().then(check)


class TorchCollectives:
    """The back-end over a torch.distributed process group (one local worker: this rank).

    Args:
        process_group: the group to communicate in, e.g. DDP's own or an intra-/inter-node group of
            a hierarchy; None means the default group. Resolved lazily, so the back-end can be
            built before ``init_process_group``.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def local_ranks(self) -> Sequence[int]:
        return (dist.get_rank(self.process_group),)

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> Future[Tensor]:
        (tensor,) = tensors
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)
        assert work is not None
        return _first(work, tensor)

    def all_gather(self, inputs: Sequence[Tensor], output: Tensor) -> Future[Tensor]:
        (send,) = inputs
        work = _all_gather_single(output, send, group=self.process_group, async_op=True)
        assert work is not None
        return _first(work, output)

    def reduce_scatter_sum(
        self, inputs: Sequence[Tensor], outputs: Sequence[Tensor], scratch: Tensor | None = None
    ) -> Future[Tensor]:
        (send,), (out,) = inputs, outputs
        received = torch.empty_like(send) if scratch is None else scratch
        # all_to_all sends chunk j to rank j: this rank receives every rank's chunk of its own share,
        # in rank order, and adds them itself (the order a ring would not keep).
        work = dist.all_to_all_single(received, send, group=self.process_group, async_op=True)
        assert work is not None

        def add(future: Future[list[Tensor]]) -> Tensor:
            future.value()  # re-raises a failed collective's error into the returned future
            return _sum_chunks_in_rank_order(received, self.world_size, out)

        return work.get_future().then(add)

    def broadcast(self, tensors: Sequence[Tensor], src: int) -> Future[Tensor]:
        (tensor,) = tensors
        source = src if self.process_group is None else dist.get_global_rank(self.process_group, src)
        work = dist.broadcast(tensor, src=source, group=self.process_group, async_op=True)
        assert work is not None
        return _first(work, tensor)


class InProcessCollectives:
    """The back-end of K virtual workers in one process: sums in rank order, completed futures.

    Args:
        world_size: number of workers K (all of them local).
    """

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self._world_size = world_size

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_ranks(self) -> Sequence[int]:
        return tuple(range(self._world_size))

    def _check(self, tensors: Sequence[Tensor]) -> None:
        if len(tensors) != self._world_size:
            raise ValueError(f"expected one tensor per worker ({self._world_size}), got {len(tensors)}")

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> Future[Tensor]:
        self._check(tensors)
        total = tensors[0]
        for tensor in tensors[1:]:
            total.add_(tensor)
        return _done(total)

    def all_gather(self, inputs: Sequence[Tensor], output: Tensor) -> Future[Tensor]:
        self._check(inputs)
        numel = inputs[0].numel()
        for rank, send in enumerate(inputs):
            output[rank * numel : (rank + 1) * numel].copy_(send)
        return _done(output)

    def reduce_scatter_sum(
        self, inputs: Sequence[Tensor], outputs: Sequence[Tensor], scratch: Tensor | None = None
    ) -> Future[Tensor]:
        self._check(inputs)
        self._check(outputs)
        world = self._world_size
        chunk = outputs[0].numel()
        for rank, out in enumerate(outputs):
            # What rank `rank` receives from an all-to-all: every worker's chunk `rank`, in rank order.
            received = [send[rank * chunk : (rank + 1) * chunk] for send in inputs]
            _sum_chunks_in_rank_order(torch.cat(received), world, out)
        return _done(outputs[0])

    def broadcast(self, tensors: Sequence[Tensor], src: int) -> Future[Tensor]:
        self._check(tensors)
        if src != 0:
            tensors[0].copy_(tensors[src])
        return _done(tensors[0])
