"""The reducer seam: one DDP bucket in, one future of its update direction out.

:func:`~lightning_gmc.hook.gmc_hook` screens a bucket's gradient and hands it to the state's
:class:`Reducer`, which runs the method and its exchange and returns the future DDP waits on. Two
reducers exist:

* :class:`FlatReducer`: every rank is a worker; the method's exchange runs over the whole process
  group (``hierarchy="flat"``);
* :class:`~lightning_gmc.hook.node_reducer.NodeReducer`: one worker per node; each rank of a node
  runs the method on its shard of the bucket, between nodes (``hierarchy="node"``).

A reducer owns what differs between them: the worker state it creates (which parameters or pieces of
them, which logical rank), the process groups and the exchange over them, its traffic counters, and
how its state maps onto a checkpoint's full per-parameter tensors. The hook state keeps what they
share (the optimizer binding, the step clock, the swap, the checkpoint codec).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from lightning_gmc.hook import codec
from lightning_gmc.methods import (
    BucketState,
    BucketStep,
    GroupHyper,
    Method,
    ParameterTable,
    StepSnapshot,
    WorkerState,
)
from lightning_gmc.transport import CommStats, Exchange, LeaderSupport, TorchCollectives

#: ``{buffer name: {parameter or piece name: tensor}}``, as :meth:`WorkerState.state_dict` gives it
Buffers = dict[str, dict[str, Tensor]]

__all__ = ["BucketWork", "Buffers", "FlatReducer", "Reducer", "method_step", "read_whole"]


@dataclass
class BucketWork:
    """One DDP bucket of one step, as a reducer receives it.

    Attributes:
        index: DDP's bucket index (named in errors).
        params: the bucket's parameters, in bucket order.
        param_indices: their positions in the model's parameter table.
        buffer: DDP's bucket buffer; the future's result is written into it (or is a state buffer of
            the same dtype and size that holds the direction).
        grad: the fp32 gradient the method reads (``buffer`` itself for an fp32 bucket), already
            screened by the non-finite policy.
        hypers: this step's hyper-parameters per optimizer param group.
        step: the optimizer step.
    """

    index: int
    params: list[Tensor]
    param_indices: tuple[int, ...]
    buffer: Tensor
    grad: Tensor
    hypers: list[GroupHyper]
    step: int


class Reducer(Protocol):
    """How one rank turns bucket gradients into update directions (module docstring)."""

    @property
    def exchange(self) -> Exchange:
        """The method's exchange (over the K workers the method sees)."""
        ...

    @property
    def support(self) -> LeaderSupport:
        """The support agreement of ``topk_shared``, over the exchange's collectives."""
        ...

    def attach(self, method: Method, table: ParameterTable, device: torch.device, seed: int) -> WorkerState:
        """Create this rank's method state for the model's parameters (called once, at attach)."""
        ...

    def reduce(self, work: BucketWork) -> Future[Tensor]:
        """Issue every collective of the bucket now, in the caller's thread; the future yields the
        bucket's update direction."""
        ...

    @property
    def failure(self) -> Exception | None:
        """The error of a step whose method state this reducer could not keep whole (a failed
        collective; under ``hierarchy="node"`` also an fp16 overflow), until :meth:`clear_failure`.
        The hook state refuses to be saved while there is one."""
        ...

    def clear_failure(self) -> None:
        """The state was loaded from a checkpoint: it is whole again."""
        ...

    def restore_step(self) -> None:
        """Put back the method buffers of every bucket of the current step as they were before it (a
        refused step, :mod:`~lightning_gmc.hook.refusal`); the reducer keeps them when its method sends
        fp16."""
        ...

    def check_finite(self, skipped: Tensor, bucket_index: int, num_params: int, step: int) -> None:
        """``nonfinite="raise"``: raise FloatingPointError if this rank's bucket gradient was not finite
        (``skipped``, a bool device scalar), on every rank that must stop (a host sync)."""
        ...

    def residuals(self) -> Sequence[Tensor] | None:
        """This rank's worker's full residual per model parameter (flat fp32), or None for a method
        without one. A collective under ``hierarchy="node"`` (the shards are gathered): call it on
        every rank at the same point."""
        ...

    def gather_state(
        self, rank_state: dict[str, Any], training_parameters: dict[str, Tensor] | None
    ) -> dict[str, Any]:
        """The gathered checkpoint block from this rank's ``rank_state`` (a collective): full
        per-parameter tensors of every worker (``lightning_gmc.hook.codec``)."""
        ...

    def to_local(self, buffers: dict[str, Any]) -> dict[str, Any]:
        """Full per-parameter buffers (a checkpoint's) -> what this rank's worker state loads."""
        ...

    def state_changed(self) -> None:
        """The worker state was loaded or reset outside a step."""
        ...

    def topology(self) -> dict[str, Any]:
        """How workers map onto ranks (recorded in gathered checkpoints)."""
        ...

    def add_metrics(self, metrics: dict[str, float]) -> None:
        """Add the reducer's own per-step metrics to ``metrics`` (this step's, from the exchange's
        ``CommStats``) and reset their per-step counters."""
        ...


def read_whole(params: Sequence[Tensor]) -> Callable[[Tensor], None]:
    """Reads the values of whole parameters into a flat fp32 vector (a bucket's, in bucket order)."""

    def read(out: Tensor) -> None:
        torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params], out=out)

    return read


def method_step(
    worker: WorkerState,
    exchange: Exchange,
    support: LeaderSupport,
    bucket_state: BucketState,
    grad: Tensor,
    read_params: Callable[[Tensor], None],
    work: BucketWork,
) -> BucketStep:
    """This worker's method step on ``grad`` (whose parameter values ``read_params`` reads), in
    place: ``out`` is ``grad``."""
    return BucketStep(
        bucket=bucket_state,
        grad=grad,
        out=grad,
        hypers=work.hypers,
        step=work.step,
        rng=worker.rng,
        world_size=exchange.world_size,
        read_params=read_params,
        agree_support=support.bind(work.step, worker.rank, work.index),
    )


class FlatReducer:
    """Every rank is a worker: the method runs on the whole bucket, its exchange over ``process_group``.

    Issues one collective per message (one per bucket for every method except at CSER-style reset
    steps), or two for a sum taken in rank order (a reduce-scatter, waited for, then an all-gather;
    ``transport/exchange/ordered.py``), in the caller's thread, preceded by the support's broadcast
    for ``topk_shared``; only local decoding runs in the future's callback. With ``wire_dtype="fp16"``
    the exchange is waited for in the caller's thread too, and the buffers the step touches are kept
    so that a refused step can be undone (:meth:`restore_step`).

    Args:
        stats: the traffic counters of the exchange.
        process_group: the group DDP reduces in; None means the default group.
    """

    def __init__(self, stats: CommStats, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self._exchange = Exchange(TorchCollectives(process_group), stats)
        self._support = LeaderSupport(self._exchange.collectives, stats)
        self.method: Method | None = None
        self.worker: WorkerState | None = None
        self._snapshot: StepSnapshot | None = None

    @property
    def exchange(self) -> Exchange:
        return self._exchange

    @exchange.setter
    def exchange(self, exchange: Exchange) -> None:
        self._exchange = exchange

    @property
    def support(self) -> LeaderSupport:
        return self._support

    def attach(self, method: Method, table: ParameterTable, device: torch.device, seed: int) -> WorkerState:
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank(self.process_group) if distributed else 0
        self.method = method
        self.worker = WorkerState(method, table, device, rank, seed)
        self._snapshot = StepSnapshot() if method.sends_fp16() else None
        return self.worker

    def reduce(self, work: BucketWork) -> Future[Tensor]:
        method, worker = self.method, self.worker
        assert method is not None and worker is not None, "attach() runs before the first bucket"
        bucket_state = worker.bucket(work.param_indices)
        if self._snapshot is not None:
            self._snapshot.keep(work.step, bucket_state)
        step = method_step(
            worker, self.exchange, self.support, bucket_state, work.grad, read_whole(work.params), work
        )
        messages = method.encode(step)
        future = self.exchange.start(
            [messages], [bucket_state], work.step, work.index, dense_element_size=work.buffer.element_size()
        )
        buffer = work.buffer

        def finish(fut: Future[list[list[Tensor]]]) -> Tensor:
            method.complete(step, messages, fut.value()[0])
            direction = step.direction()
            if direction is buffer:
                return buffer
            if buffer.dtype == torch.float32:
                # A state buffer that holds the direction (e.g. GMC's momentum): DDP copies the hook's
                # result into the parameters' gradients, so handing it over saves a copy into the bucket.
                # The method leaves it unchanged until this bucket's next encode, after that copy.
                return direction
            buffer.copy_(direction)  # a bf16 bucket gets the direction rounded
            return buffer

        return future.then(finish)

    @property
    def failure(self) -> Exception | None:
        return self._exchange.failed

    def clear_failure(self) -> None:
        self._exchange.failed = None

    def restore_step(self) -> None:
        if self._snapshot is not None:
            self._snapshot.restore()

    def check_finite(self, skipped: Tensor, bucket_index: int, num_params: int, step: int) -> None:
        # Only this rank stops; the others fail in this bucket's collective once its process ends.
        if bool(skipped):
            raise FloatingPointError(
                f"non-finite gradient in a bucket of {num_params} parameters at step {step} on "
                f"{self.exchange.describe_rank()}"
            )

    def residuals(self) -> Sequence[Tensor] | None:
        return None if self.worker is None else self.worker.tensors.get("residual")

    def gather_state(
        self, rank_state: dict[str, Any], training_parameters: dict[str, Tensor] | None
    ) -> dict[str, Any]:
        return codec.gather_state(rank_state, training_parameters, self.process_group)

    def to_local(self, buffers: dict[str, Any]) -> dict[str, Any]:
        return buffers

    def state_changed(self) -> None:
        return None

    def topology(self) -> dict[str, Any]:
        return {"hierarchy": "flat"}

    def add_metrics(self, metrics: dict[str, float]) -> None:
        return None
