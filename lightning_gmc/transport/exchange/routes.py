"""One object per route (``transport/routing.py`` chooses which): what a message slot sends, which
collective carries it, and how every local worker's mean is decoded when it completes.

A route's :meth:`~RouteLauncher.launch` issues its collectives now, in the caller's thread, records the
message's traffic and returns a :class:`Launched`: the futures in flight and the local ``finish`` that
decodes once they have completed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gmc.compressors import Payload, TensorSpec
from lightning_gmc.methods import Message
from lightning_gmc.transport.exchange.column import Column, Launched, RouteLauncher
from lightning_gmc.transport.routing import Route, decode_mean

__all__ = ["ROUTES"]


class LocalRoute:
    """K = 1: nothing crosses a link; the worker's payload is its own mean."""

    def launch(self, column: Column) -> Launched:
        first = column.messages[0]
        compressor, plan, payload = first.compressor, first.plan, first.payload
        mean = column.mean_buffer(0)
        column.record("local", 0)

        def finish() -> Tensor:
            decode_mean(compressor, plan, [payload], mean)
            column.stats.record_broadcast(lambda: compressor.broadcast_bits([payload], plan), column.step)
            return mean

        return Launched(column, "local decode", [], finish)


class SharedSupportRoute:
    """A shared support (identity, RBGS, shared-seed random-k, ``topk_shared``): the ``values`` of every
    worker are summed by one all-reduce and decoded once."""

    def launch(self, column: Column) -> Launched:
        first = column.messages[0]
        compressor, plan, payload = first.compressor, first.plan, first.payload
        mean = column.mean_buffer(0)
        values = [message.payload.tensors["values"] for message in column.messages]
        column.record("allreduce", values[0].numel() * values[0].element_size())
        future = column.collectives.all_reduce_sum(values)
        world = column.world

        def finish() -> Tensor:
            # The summed values decode (linearly) into the sum; the compressor divides once.
            compressor.decode_summed(payload, plan, mean, world)
            column.stats.record_broadcast(lambda: compressor.broadcast_bits([payload], plan), column.step)
            return mean

        return Launched(column, "all_reduce", [future], finish)


class DenseRoute:
    """The all-gather would cost more than a dense all-reduce (``docs/algorithms.md`` 3.7): every worker
    decodes its own payload into a dense vector, and the vectors are all-reduced."""

    def launch(self, column: Column) -> Launched:
        first = column.messages[0]
        compressor = first.compressor
        dense = [column.mean_buffer(worker) for worker in range(len(column.messages))]
        mean = dense[0]
        for message, vector in zip(column.messages, dense, strict=True):
            vector.zero_()
            message.compressor.decompress_add(message.payload, message.plan, vector)
        # A 16-bit wire sends the decoded vectors in it (exact: they hold 16-bit values and zeros).
        wire_dtype = compressor.value_dtype
        sent = dense
        if wire_dtype != mean.dtype:
            sent = [
                bucket.workspace(f"wire{column.index}", mean.numel(), wire_dtype).copy_(vector)
                for bucket, vector in zip(column.buckets, dense, strict=True)
            ]
        column.record("dense", sent[0].numel() * sent[0].element_size())
        future = column.collectives.all_reduce_sum(sent)
        value_bits = 8.0 * sent[0].element_size()
        world, step, stats = column.world, column.step, column.stats

        def finish() -> Tensor:
            if sent is not dense:
                mean.copy_(sent[0])
            mean.div_(world)
            if compressor.sparse:  # counted now (no host sync): mean may be a state buffer
                nonzero = torch.count_nonzero(mean)
                stats.record_broadcast(lambda: (value_bits + 32.0) * int(nonzero), step)
            else:
                stats.record_broadcast(lambda: value_bits * mean.numel(), step)
            return mean

        return Launched(column, "dense all_reduce", [future], finish)


class GatherRoute:
    """A private support (top-k, quantizers): every worker's payload is packed into one byte buffer of
    the plan's fixed size and all-gathered once; every worker decodes the K payloads in rank order."""

    def launch(self, column: Column) -> Launched:
        first = column.messages[0]
        compressor, plan = first.compressor, first.plan
        mean = column.mean_buffer(0)
        index, world = column.index, column.world
        nbytes = plan.payload_nbytes
        sends = [
            _pack(message, bucket.workspace(f"send{index}", nbytes, torch.uint8))
            for message, bucket in zip(column.messages, column.buckets, strict=True)
        ]
        recv = column.buckets[0].workspace(f"recv{index}", nbytes * world, torch.uint8)
        column.record("allgather", nbytes)
        future = column.collectives.all_gather(sends, recv)

        def finish() -> Tensor:
            payloads = [_unpack(recv[r * nbytes : (r + 1) * nbytes], plan.payload) for r in range(world)]
            decode_mean(compressor, plan, payloads, mean)
            # The union of supports (a unique() for sparse payloads) is counted only when the
            # metrics are taken (CommStats.defer_rcc); recv stays intact until the next step.
            column.stats.record_broadcast(lambda: compressor.broadcast_bits(payloads, plan), column.step)
            return mean

        return Launched(column, "all_gather", [future], finish)


#: The launcher of every route (``routing.choose_route`` names it).
ROUTES: dict[Route, RouteLauncher] = {
    "local": LocalRoute(),
    "allreduce": SharedSupportRoute(),
    "dense": DenseRoute(),
    "allgather": GatherRoute(),
}


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
