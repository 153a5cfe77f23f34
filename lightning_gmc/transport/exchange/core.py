"""The :class:`Exchange`: routes every message slot of a bucket, then checks and decodes the results."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.futures import Future

from lightning_gmc.methods import BucketState, Message
from lightning_gmc.transport.collectives import Collectives
from lightning_gmc.transport.exchange.column import Column, Launched
from lightning_gmc.transport.exchange.failures import check_fp16_range, failure
from lightning_gmc.transport.exchange.routes import ROUTES
from lightning_gmc.transport.routing import choose_route
from lightning_gmc.transport.stats import CommStats

__all__ = ["Exchange", "Means"]

#: Per local worker, each message slot's mean over all workers.
Means = list[list[Tensor]]


class Exchange:
    """Averages the messages of every worker, over a collective back-end.

    Args:
        collectives: the back-end (which workers take part, and which of them are local).
        stats: counters the traffic is recorded into, once per message and as one worker sees it.
    """

    def __init__(self, collectives: Collectives, stats: CommStats) -> None:
        self.collectives = collectives
        self.stats = stats

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
        self.stats.record_bucket(buckets[0].numel, self.world_size, dense_element_size, step)
        where = (
            f"bucket {bucket_index} ({buckets[0].numel} elements) at step {step} on rank "
            f"{self.collectives.local_ranks[0]}"
        )
        launched = [self._launch(index, messages, buckets, step, where) for index in range(slots)]

        def finish_all(combined: Future[list[Future[Tensor]]] | None = None) -> Means:
            _check_results(launched, combined, where)
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
        if not futures:
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
    ) -> Launched:
        column = Column(
            index, [sent[index] for sent in messages], buckets, self.collectives, self.stats, step, where
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
