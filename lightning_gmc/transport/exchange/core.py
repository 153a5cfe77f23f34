"""The :class:`Exchange`: routes every message slot of a bucket, then checks and decodes the results."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.futures import Future

from lightning_gmc.methods import BucketState, Message
from lightning_gmc.transport.collectives import Collectives
from lightning_gmc.transport.exchange.column import Column, Launched
from lightning_gmc.transport.exchange.failures import (
    CollectiveFailure,
    check_fp16_range,
    failure,
    wait_or_fail,
)
from lightning_gmc.transport.exchange.routes import ROUTES
from lightning_gmc.transport.routing import SumOrder, check_sum_order, choose_route
from lightning_gmc.transport.stats import CommStats

__all__ = ["Exchange", "Means"]

#: Per local worker, each message slot's mean over all workers.
Means = list[list[Tensor]]


class Exchange:
    """Averages the messages of every worker, over a collective back-end.

    Args:
        collectives: the back-end (which workers take part, and which of them are local).
        stats: counters the traffic is recorded into, once per message and as one worker sees it.
        rank_label: how error messages name this process; None: ``"rank <r>"`` with its rank in the
            collectives' group (which is not the global rank under ``hierarchy="node"``).
        fp32_order: how the summing routes add fp32 values with ``K >= 3`` workers: ``"rank"`` (in
            rank order: the bits do not depend on K's ring or DDP's bucket layout, a run equals its
            simulation and its resume; two collectives, the first waited for in the caller's thread),
            ``"ring"`` (one all-reduce in the back-end's order), or None (default): ``"rank"`` while
            ``torch.are_deterministic_algorithms_enabled()`` (``Trainer(deterministic=True)``), else
            rank order for a sparse support's values and the ring for dense vectors (the identity,
            the dense fallback), read at every :meth:`start`. 16-bit values are always added in rank
            order (:func:`~lightning_gmc.transport.routing.sums_in_rank_order`).
    """

    def __init__(
        self,
        collectives: Collectives,
        stats: CommStats,
        rank_label: str | None = None,
        fp32_order: SumOrder | None = None,
    ) -> None:
        self.collectives = collectives
        self.stats = stats
        self.rank_label = rank_label
        self.fp32_order = None if fp32_order is None else check_sum_order(fp32_order)
        #: the first collective that failed (its step's state may be half-summed), until cleared
        self.failed: CollectiveFailure | None = None

    def describe_rank(self) -> str:
        """This process as error messages name it (:attr:`rank_label`, else its rank in the group)."""
        return self.rank_label or f"rank {self.collectives.local_ranks[0]}"

    def current_fp32_order(self) -> SumOrder | None:
        """The order fp32 sums take now: ``fp32_order``, ``"rank"`` in deterministic mode, else None
        (by the summed vector's density)."""
        if self.fp32_order is not None:
            return self.fp32_order
        return "rank" if torch.are_deterministic_algorithms_enabled() else None

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
        """Issue every collective of every message slot now; the future yields, per local worker, each
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
        bucket, overwritten by the next exchange of that bucket. A message whose sum was rounded to
        16 bits gets its worker's :attr:`~lightning_gmc.methods.Message.undelivered`.

        With ``wire_dtype="fp16"`` everything is waited for and decoded here, in the caller's thread,
        and an overflow raises :class:`WireOverflow` from this call on every rank alike (nothing of the
        bucket is left in flight, so the caller can restore the step's state).
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
        self.stats.record_bucket(buckets[0].numel, self.world_size, dense_element_size, step)
        where = (
            f"bucket {bucket_index} ({buckets[0].numel} elements) at step {step} on {self.describe_rank()}"
        )
        order = self.current_fp32_order()
        try:
            launched = [self._launch(index, messages, buckets, step, where, order) for index in range(slots)]
        except CollectiveFailure as err:  # a reduce-scatter waited for in this thread
            self.failed = err
            raise

        def finish_all(combined: Future[list[Future[Tensor]]] | None = None) -> Means:
            try:
                _check_results(launched, combined, where)
            except CollectiveFailure as err:
                self.failed = err
                raise
            means = [item.finish() for item in launched]
            for message, mean in zip(messages[0], means, strict=True):
                if message.compressor.value_dtype == torch.float16:
                    check_fp16_range(mean, message, where)
            copies = [
                [_worker_copy(mean, worker, item) for mean, item in zip(means, launched, strict=True)]
                for worker in range(1, workers)
            ]
            return [means, *copies]

        futures = [future for item in launched for future in item.futures]
        refusable = any(message.compressor.value_dtype == torch.float16 for message in messages[0])
        if not futures or refusable:
            try:
                for item in launched:
                    for future in item.futures:
                        wait_or_fail(future, f"{item.collective} of message {item.column.index}", where)
            except CollectiveFailure as err:
                self.failed = err
                raise
            done: Future[Means] = Future()
            done.set_result(finish_all())
            return done
        # then() keeps CUDA stream semantics: decoding waits for the collectives, and whoever waits
        # on the returned future waits for the decoding.
        return torch.futures.collect_all(futures).then(finish_all)

    def _launch(
        self,
        index: int,
        messages: Sequence[Sequence[Message]],
        buckets: Sequence[BucketState],
        step: int,
        where: str,
        fp32_order: SumOrder | None,
    ) -> Launched:
        column = Column(
            index,
            [sent[index] for sent in messages],
            buckets,
            self.collectives,
            self.stats,
            step,
            where,
            fp32_order,
        )
        first = column.messages[0]
        route = choose_route(first.compressor, first.plan, self.world_size)
        return ROUTES[route].launch(column)


def _check_results(
    launched: Sequence[Launched], combined: Future[list[Future[Tensor]]] | None, where: str
) -> None:
    """Re-raise the first failed collective before anything is decoded. collect_all fails as soon as
    one collective fails, possibly before the others are done; the failed one is done."""
    for item in launched:
        for future in item.futures:
            if future.done():
                try:
                    future.value()
                except Exception as err:
                    raise failure(f"{item.collective} of message {item.column.index}", where, err) from err
    if combined is not None:
        try:
            combined.value()
        except Exception as err:
            raise failure("exchange", where, err) from err


def _worker_copy(mean: Tensor, worker: int, item: Launched) -> Tensor:
    """Another local worker's own copy of the mean, in the buffer its message asked for."""
    return item.column.mean_buffer(worker).copy_(mean)
