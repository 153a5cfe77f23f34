"""The torch.distributed transport: one fixed-size collective per message, issued immediately.

Every collective is launched in the caller's thread (the DDP hook body), in bucket order, and only
local decoding runs in the returned future's callback: launching a collective from a ``.then()``
callback mixes up the collective order across ranks on gloo (``spec/ecosystem.md`` §0.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from lightning_gmc.compressors import Payload
from lightning_gmc.methods import BucketState, Message
from lightning_gmc.transport.base import (
    CommStats,
    Route,
    choose_route,
    decode_mean,
    nonzero_bits,
)

__all__ = ["DistributedTransport"]

# torch 2.14 renamed all_gather_into_tensor; keep working on the older releases we support.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _completed(value: list[Tensor]) -> Future[list[Tensor]]:
    fut: Future[list[Tensor]] = Future()
    fut.set_result(value)
    return fut


class DistributedTransport:
    """Exchange messages between the ranks of a process group.

    Args:
        process_group: the group to communicate in (DDP's own); None means the default group.
        stats: counters to record traffic into.
    """

    def __init__(self, process_group: dist.ProcessGroup | None, stats: CommStats) -> None:
        self.process_group = process_group
        self.stats = stats

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    def start(self, messages: Sequence[Message], bucket: BucketState) -> Future[list[Tensor]]:
        """Launch one collective per message now; the future yields each message's mean over ranks."""
        world = self.world_size
        finishers = []
        futures: list[Future] = []
        for index, message in enumerate(messages):
            mean = message.decode_into
            if mean is None:
                mean = bucket.workspace(f"mean{index}", message.plan.numel)
            route = choose_route(message.compressor, message.plan, world)
            finish, future = self._launch(route, message, mean, bucket, index, world)
            finishers.append(finish)
            if future is not None:
                futures.append(future)

        def finish_all(_: Future) -> list[Tensor]:
            return [finish() for finish in finishers]

        if not futures:
            return _completed(finish_all(_completed([])))
        return torch.futures.collect_all(futures).then(finish_all)

    def _launch(
        self, route: Route, message: Message, mean: Tensor, bucket: BucketState, index: int, world: int
    ):  # type: ignore[no-untyped-def]
        compressor, plan, payload = message.compressor, message.plan, message.payload
        upload_bits = compressor.payload_bits(plan)
        nnz = compressor.nnz(plan)
        if route == "local":
            self.stats.record_message(route, world, 0, nnz, upload_bits)

            def finish_local() -> Tensor:
                decode_mean(compressor, plan, [payload], mean)
                self.stats.record_broadcast(compressor.broadcast_bits([payload], plan))
                return mean

            return finish_local, None

        if route == "allreduce":
            values = payload.tensors["values"]
            self.stats.record_message(route, world, values.numel() * values.element_size(), nnz, upload_bits)
            work = dist.all_reduce(values, group=self.process_group, async_op=True)

            def finish_allreduce() -> Tensor:
                # The summed values decode (linearly) into the sum; divide once.
                compressor.decode_summed(payload, plan, mean, world)
                self.stats.record_broadcast(compressor.broadcast_bits([payload], plan))
                return mean

            return finish_allreduce, work.get_future()

        if route == "dense":
            mean.zero_()
            compressor.decompress_add(payload, plan, mean)
            self.stats.record_message(route, world, mean.numel() * mean.element_size(), nnz, upload_bits)
            work = dist.all_reduce(mean, group=self.process_group, async_op=True)

            def finish_dense() -> Tensor:
                mean.div_(world)
                self.stats.record_broadcast(nonzero_bits(compressor, mean))
                return mean

            return finish_dense, work.get_future()

        # allgather: pack every payload tensor into one byte buffer of fixed size.
        nbytes = plan.payload_nbytes
        send = bucket.workspace(f"send{index}", nbytes, torch.uint8)
        recv = bucket.workspace(f"recv{index}", nbytes * world, torch.uint8)
        offset = 0
        for spec in plan.payload:
            tensor = payload.tensors[spec.name]
            if tensor.numel() != spec.numel or tensor.dtype != spec.dtype:
                raise RuntimeError(
                    f"{compressor.name} produced {spec.name} with {tensor.numel()} x {tensor.dtype}, "
                    f"its plan promised {spec.numel} x {spec.dtype}"
                )
            send[offset : offset + spec.nbytes].copy_(tensor.contiguous().view(torch.uint8))
            offset += spec.nbytes
        self.stats.record_message(route, world, nbytes, nnz, upload_bits)
        work = _all_gather_single(recv, send, group=self.process_group, async_op=True)

        def finish_gather() -> Tensor:
            payloads = [_unpack(recv[r * nbytes : (r + 1) * nbytes], plan.payload) for r in range(world)]
            decode_mean(compressor, plan, payloads, mean)
            self.stats.record_broadcast(compressor.broadcast_bits(payloads, plan))
            return mean

        return finish_gather, work.get_future()


def _unpack(chunk: Tensor, specs) -> Payload:  # type: ignore[no-untyped-def]
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
