"""The exchange: one implementation of routing, payload packing and traffic accounting.

Every message of a bucket goes through :meth:`Exchange.start`, in the DDP hook (one local worker,
:class:`~lightning_gmc.transport.collectives.TorchCollectives`) and in the simulator (K local
workers, :class:`~lightning_gmc.transport.collectives.InProcessCollectives`), so the two compute
the same thing by construction.

Ordering and failures:

* Every collective is issued in the caller's thread, in message order, when :meth:`Exchange.start`
  is called (the DDP hook body, in bucket order). Only local decoding runs when the collectives
  complete: issuing a collective from a future's callback runs it on gloo's completion thread, and
  different ranks then issue collectives in different orders.
* A failed collective (a dead peer, a timeout) fails the returned future with a
  :class:`CollectiveFailure` naming the collective, the message, the bucket and the step. Every
  collective's result is checked before anything is decoded, so nothing stale is ever decoded or
  applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.futures import Future

from lightning_gmc.compressors import Payload, TensorSpec
from lightning_gmc.methods import BucketState, Message
from lightning_gmc.transport.collectives import Collectives
from lightning_gmc.transport.routing import choose_route, decode_mean
from lightning_gmc.transport.stats import CommStats

__all__ = ["CollectiveFailure", "Exchange"]

#: Per local worker, each message slot's mean over all workers.
Means = list[list[Tensor]]


class CollectiveFailure(RuntimeError):
    """A collective of the exchange failed (typically a peer process died or timed out)."""


@dataclass
class _Launched:
    """One message's collective in flight and the local decoding that follows it."""

    index: int
    collective: str
    future: Future[Tensor] | None
    finish: Callable[[], Tensor]


class Exchange:
    """Averages the messages of every worker, over a collective back-end.

    Args:
        collectives: the back-end (which workers take part, and which of them are local).
        stats: counters the traffic is recorded into, once per message and as one worker sees it.
        rank_label: how error messages name this process; None: ``"rank <r>"`` with its rank in the
            collectives' group (which is not the global rank under ``hierarchy="node"``).
    """

    def __init__(self, collectives: Collectives, stats: CommStats, rank_label: str | None = None) -> None:
        self.collectives = collectives
        self.stats = stats
        self.rank_label = rank_label

    def describe_rank(self) -> str:
        """This process as error messages name it (:attr:`rank_label`, else its rank in the group)."""
        return self.rank_label or f"rank {self.collectives.local_ranks[0]}"

    @property
    def world_size(self) -> int:
        """Number of workers K."""
        return self.collectives.world_size

    def start(
        self,
        messages: Sequence[Sequence[Message]],
        buckets: Sequence[BucketState],
        step: int,
        bucket_index: int = 0,
        dense_element_size: int = 4,
    ) -> Future[Means]:
        """Issue one collective per message slot now; the future yields, per local worker, each
        slot's mean over all workers.

        Args:
            messages: ``messages[w][i]`` is local worker ``w``'s ``i``-th message; every worker
                sends the same number of messages with the same compressors.
            buckets: each local worker's state of this bucket (owns the exchange's workspaces).
            step: the optimizer step (for the accounting, and named in errors).
            bucket_index: the bucket's index (named in errors).
            dense_element_size: bytes per element of the uncompressed bucket (the ``dense_bytes``
                reference: 4 for fp32 gradients, 2 for bf16).

        The yielded tensors are each message's ``decode_into`` or a workspace of its worker's
        bucket, overwritten by the next exchange of that bucket.
        """
        workers = len(self.collectives.local_ranks)
        if len(messages) != workers or len(buckets) != workers:
            raise ValueError(
                f"expected messages and buckets of {workers} local workers, got {len(messages)} and "
                f"{len(buckets)}"
            )
        slots = len(messages[0])
        if any(len(sent) != slots for sent in messages):
            raise ValueError(f"every worker must send {slots} messages, got {[len(m) for m in messages]}")
        world = self.world_size
        self.stats.record_bucket(buckets[0].numel, world, dense_element_size, step)
        launched = [
            self._launch(index, [sent[index] for sent in messages], buckets, world, step)
            for index in range(slots)
        ]
        where = (
            f"bucket {bucket_index} ({buckets[0].numel} elements) at step {step} on {self.describe_rank()}"
        )

        def fail(what: str, err: Exception) -> CollectiveFailure:
            return CollectiveFailure(
                f"lightning_gmc: the {what} of {where} failed; no update was applied (a peer process "
                f"probably died or timed out): {err}"
            )

        def finish_all(combined: Future[list[Future[Tensor]]] | None = None) -> Means:
            # Check every result before decoding anything. collect_all fails as soon as one
            # collective fails, possibly before the others are done; the failed one is done.
            for item in launched:
                if item.future is not None and item.future.done():
                    try:
                        item.future.value()
                    except Exception as err:
                        raise fail(f"{item.collective} of message {item.index}", err) from err
            if combined is not None:
                try:
                    combined.value()
                except Exception as err:
                    raise fail("exchange", err) from err
            means = [item.finish() for item in launched]
            for message, mean in zip(messages[0], means, strict=True):
                if message.compressor.value_dtype == torch.float16:
                    _check_fp16_range(mean, message, where)
            copies = [
                [_worker_copy(mean, sent[i], bucket, i) for i, mean in enumerate(means)]
                for sent, bucket in zip(messages[1:], buckets[1:], strict=True)
            ]
            return [means, *copies]

        futures = [item.future for item in launched if item.future is not None]
        if not futures:
            done: Future[Means] = Future()
            done.set_result(finish_all())
            return done
        # then() keeps CUDA stream semantics: decoding waits for the collectives, and whoever waits
        # on the returned future waits for the decoding.
        return torch.futures.collect_all(futures).then(finish_all)

    def _launch(
        self, index: int, column: Sequence[Message], buckets: Sequence[BucketState], world: int, step: int
    ) -> _Launched:
        first = column[0]
        compressor, plan, payload = first.compressor, first.plan, first.payload
        mean = _mean_buffer(first, buckets[0], index)
        route = choose_route(compressor, plan, world)
        upload_bits = compressor.payload_bits(plan)
        nnz = compressor.nnz(plan)

        if route == "local":
            self.stats.record_message(route, world, 0, nnz, upload_bits, step)

            def finish_local() -> Tensor:
                decode_mean(compressor, plan, [payload], mean)
                self.stats.record_broadcast(lambda: compressor.broadcast_bits([payload], plan), step)
                return mean

            return _Launched(index, "local decode", None, finish_local)

        if route == "allreduce":
            values = [message.payload.tensors["values"] for message in column]
            handed = values[0].numel() * values[0].element_size()
            self.stats.record_message(route, world, handed, nnz, upload_bits, step)
            future = self.collectives.all_reduce_sum(values)

            def finish_allreduce() -> Tensor:
                # The summed values decode (linearly) into the sum; the compressor divides once.
                compressor.decode_summed(payload, plan, mean, world)
                self.stats.record_broadcast(lambda: compressor.broadcast_bits([payload], plan), step)
                return mean

            return _Launched(index, "all_reduce", future, finish_allreduce)

        if route == "dense":
            dense = [mean] + [_mean_buffer(m, b, index) for m, b in zip(column[1:], buckets[1:], strict=True)]
            for message, vector in zip(column, dense, strict=True):
                vector.zero_()
                message.compressor.decompress_add(message.payload, message.plan, vector)
            # A 16-bit wire sends the decoded vectors in it (exact: they hold 16-bit values and zeros).
            wire_dtype = compressor.value_dtype
            sent = dense
            if wire_dtype != mean.dtype:
                sent = [
                    bucket.workspace(f"wire{index}", mean.numel(), wire_dtype).copy_(vector)
                    for bucket, vector in zip(buckets, dense, strict=True)
                ]
            handed = sent[0].numel() * sent[0].element_size()
            self.stats.record_message(route, world, handed, nnz, upload_bits, step)
            future = self.collectives.all_reduce_sum(sent)
            value_bits = 8.0 * sent[0].element_size()

            def finish_dense() -> Tensor:
                if sent is not dense:
                    mean.copy_(sent[0])
                mean.div_(world)
                if compressor.sparse:  # counted now (no host sync): mean may be a state buffer
                    nonzero = torch.count_nonzero(mean)
                    self.stats.record_broadcast(lambda: (value_bits + 32.0) * int(nonzero), step)
                else:
                    self.stats.record_broadcast(lambda: value_bits * mean.numel(), step)
                return mean

            return _Launched(index, "dense all_reduce", future, finish_dense)

        # allgather: every worker's payload packed into one byte buffer of the plan's fixed size.
        nbytes = plan.payload_nbytes
        sends = [
            _pack(message, bucket.workspace(f"send{index}", nbytes, torch.uint8))
            for message, bucket in zip(column, buckets, strict=True)
        ]
        recv = buckets[0].workspace(f"recv{index}", nbytes * world, torch.uint8)
        self.stats.record_message(route, world, nbytes, nnz, upload_bits, step)
        future = self.collectives.all_gather(sends, recv)

        def finish_gather() -> Tensor:
            payloads = [_unpack(recv[r * nbytes : (r + 1) * nbytes], plan.payload) for r in range(world)]
            decode_mean(compressor, plan, payloads, mean)
            # The union of supports (a unique() for sparse payloads) is counted only when the
            # metrics are taken (CommStats.defer_rcc); recv stays intact until the next step.
            self.stats.record_broadcast(lambda: compressor.broadcast_bits(payloads, plan), step)
            return mean

        return _Launched(index, "all_gather", future, finish_gather)


def _check_fp16_range(mean: Tensor, message: Message, where: str) -> None:
    """fp16 values beyond +-65504 become infinite on the wire: stop on every rank (every rank decodes
    the same mean) instead of applying them. A host sync, only for ``wire_dtype="fp16"``."""
    if not bool(torch.isfinite(mean).all()):
        raise FloatingPointError(
            f"lightning_gmc: {message.compressor.describe()} overflowed fp16 on the wire in {where} (a value "
            f"or a sum over ranks beyond +-65504); no update was applied. Use wire_dtype='bf16' (the range "
            f"of fp32) or 'fp32'."
        )


def _mean_buffer(message: Message, bucket: BucketState, index: int) -> Tensor:
    if message.decode_into is not None:
        return message.decode_into
    return bucket.workspace(f"mean{index}", message.plan.numel)


def _worker_copy(mean: Tensor, message: Message, bucket: BucketState, index: int) -> Tensor:
    """Another local worker's own copy of the mean, in the buffer its message asked for."""
    return _mean_buffer(message, bucket, index).copy_(mean)


def _pack(message: Message, send: Tensor) -> Tensor:
    offset = 0
    for spec in message.plan.payload:
        tensor = message.payload.tensors[spec.name]
        if tensor.numel() != spec.numel or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"{message.compressor.name} produced {spec.name} with {tensor.numel()} x {tensor.dtype}, "
                f"its plan promised {spec.numel} x {spec.dtype}"
            )
        send[offset : offset + spec.nbytes].copy_(tensor.contiguous().view(torch.uint8))
        offset += spec.nbytes
    return send


def _unpack(chunk: Tensor, specs: Sequence[TensorSpec]) -> Payload:
    tensors = {}
    offset = 0
    for spec in specs:
        raw = chunk[offset : offset + spec.nbytes]
        itemsize = spec.nbytes // max(spec.numel, 1)
        if raw.storage_offset() % max(itemsize, 1):
            raw = raw.clone()  # reinterpreting bytes needs an aligned start
        tensors[spec.name] = raw.view(spec.dtype)
        offset += spec.nbytes
    return Payload(tensors)
