"""One object per route (``transport/routing.py`` chooses which): what a message slot sends, which
collective carries it, and how every local worker's mean is decoded when it completes.

A route's :meth:`~RouteLauncher.launch` issues its collectives now, in the caller's thread, records the
message's traffic and returns a :class:`Launched`: the futures in flight and the local ``finish`` that
decodes once they have completed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_gmc.compressors import CompressionPlan, Payload, TensorSpec
from lightning_gmc.methods import Message, Undelivered
from lightning_gmc.transport.exchange.column import Column, Launched, RouteLauncher
from lightning_gmc.transport.exchange.ordered import OrderedSum, Ownership, ownership_of, start_ordered_sum
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
    worker are summed (one all-reduce, or in rank order: ``ordered.py``) and decoded once."""

    def launch(self, column: Column) -> Launched:
        first = column.messages[0]
        compressor, plan, payload = first.compressor, first.plan, first.payload
        mean = column.mean_buffer(0)
        values = [message.payload.tensors["values"] for message in column.messages]
        world, stats, step = column.world, column.stats, column.step

        def broadcast_bits() -> int:
            return compressor.broadcast_bits([payload], plan)

        if not column.in_rank_order(values[0].dtype, sparse=compressor.sparse):
            column.record("allreduce", values[0].numel() * values[0].element_size())
            future = column.collectives.all_reduce_sum(values)

            def finish() -> Tensor:
                # The summed values decode (linearly) into the sum; the compressor divides once.
                compressor.decode_summed(payload, plan, mean, world)
                stats.record_broadcast(broadcast_bits, step)
                return mean

            return Launched(column, "all_reduce", [future], finish)

        owners = _owners(plan, compressor.value_counts(plan), values[0], world)
        total = start_ordered_sum(column, values, owners)
        column.record("allreduce", total.padded_bytes, in_rank_order=True)

        def finish_ordered() -> Tensor:
            summed = total.result(
                column.buckets[0].workspace(f"summed{column.index}", values[0].numel(), values[0].dtype)
            )
            compressor.decode_summed(Payload({"values": summed}, payload.context), plan, mean, world)
            stats.record_broadcast(broadcast_bits, step)
            _hand_back_shared(column, total)
            return mean

        return Launched(column, "all_gather of the summed values", [total.future], finish_ordered)


class DenseRoute:
    """The all-gather would cost more than a dense all-reduce (``docs/algorithms.md`` 3.7): every worker
    decodes its own payload into a dense vector, and the vectors are summed (one all-reduce, or in
    rank order: ``ordered.py``)."""

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
        value_bits = 8.0 * sent[0].element_size()
        world, step, stats = column.world, column.step, column.stats

        def divide_and_count() -> Tensor:
            mean.div_(world)
            if compressor.sparse:  # counted now (no host sync): mean may be a state buffer
                nonzero = torch.count_nonzero(mean)
                stats.record_broadcast(lambda: (value_bits + 32.0) * int(nonzero), step)
            else:
                stats.record_broadcast(lambda: value_bits * mean.numel(), step)
            return mean

        if not column.in_rank_order(wire_dtype, sparse=False):  # fp32 (16-bit: always in rank order)
            column.record("dense", 4 * mean.numel())
            future = column.collectives.all_reduce_sum(dense)
            return Launched(column, "dense all_reduce", [future], divide_and_count)

        plan = first.plan
        owners = _owners(plan, [seg.numel for seg in plan.segments], sent[0], world)
        total = start_ordered_sum(column, sent, owners)
        column.record("dense", total.padded_bytes, in_rank_order=True)

        def finish_ordered() -> Tensor:
            if sent is dense:
                total.result(mean)
            else:
                mean.copy_(
                    total.result(column.buckets[0].workspace(f"wire{column.index}", mean.numel(), wire_dtype))
                )
            _hand_back_dense(column, total)
            return divide_and_count()

        return Launched(column, "dense all_gather of the summed vectors", [total.future], finish_ordered)


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


def _owners(plan: CompressionPlan, counts: Sequence[int], values: Tensor, world: int) -> Ownership | None:
    """Who sums which element: fixed per parameter element for 16-bit values (their remainders belong
    to their owner whatever the bucket layout); None for fp32, cut into contiguous chunks."""
    if values.dtype == torch.float32:
        return None
    return ownership_of(plan, counts, world, values.device)


def _hand_back_shared(column: Column, total: OrderedSum) -> None:
    """Give every local worker's message what the rounding of the summed ``values`` it owns did not
    deliver, decoded as the message's own payload is (linear for a shared support)."""
    if total.remainders is None:
        return
    for worker, message in enumerate(column.messages):
        rank = column.collectives.local_ranks[worker]
        numel = message.payload.tensors["values"].numel()
        values = total.remainder_of(
            worker, rank, numel, column.buckets[worker].workspace(f"undelivered{column.index}", numel)
        )
        message.undelivered = Undelivered(values, _payload_decoder(message))


def _payload_decoder(message: Message) -> Callable[[Tensor, Tensor], None]:
    compressor, plan, context = message.compressor, message.plan, message.payload.context

    def decode_add(values: Tensor, target: Tensor) -> None:
        compressor.decompress_add(Payload({"values": values}, context), plan, target)

    return decode_add


def _hand_back_dense(column: Column, total: OrderedSum) -> None:
    """The dense route's remainders are in the bucket's coordinates: added where their owner's elements
    sit."""
    if total.remainders is None:
        return
    for worker, message in enumerate(column.messages):
        owned = total.owned(column.collectives.local_ranks[worker])
        message.undelivered = Undelivered(total.remainders[worker][: owned.numel()], _adder(owned))


def _adder(positions: Tensor) -> Callable[[Tensor, Tensor], None]:
    def add(values: Tensor, target: Tensor) -> None:
        target.index_add_(0, positions, values)

    return add


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
