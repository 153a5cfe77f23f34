"""The reducer of ``hierarchy="node"``: the 2-D scheme over a node's shards (``docs/algorithms.md`` 3.11).

Per DDP bucket, on every rank, in the hook body and in the same order everywhere:

1. pack the bucket's gradient shard-major (:class:`~lightning_gmc.methods.shards.BucketShards`) and
   **reduce-scatter** it inside the node (``Collectives.reduce_scatter_sum``: rank order, fp32
   accumulation); divide by G: this rank holds the node's mean gradient of its shard;
2. run the method on the shard, K = N workers, over the inter-node group of this local rank;
3. **all-gather** the update direction inside the node (one status element per shard rides along),
   and unpack it into DDP's bucket buffer in the future's callback.

The waits between them are unavoidable (each phase needs the last one's result) and are stream
dependencies, not host waits, on NCCL. Per rank and bucket of ``n`` elements of ``e`` bytes and
largest shard ``S`` this sends ``(G-1) e (2 S + 1)`` bytes inside the node
(:func:`~lightning_gmc.transport.two_level_intra_bytes`): the 2-D floor ``2 (G-1)/G e n``, plus the
padding (the largest shard of the bucket sets every rank's chunk) and one status element per shard.
Detached-point methods add an all-gather of the residual once per step
(:func:`~lightning_gmc.transport.residual_gather_bytes`). The method's state is the rank's shard of
its node's (1/G of a flat run's).

Failures: a failed intra-node collective raises a :class:`~lightning_gmc.transport.CollectiveFailure`
naming the collective, the bucket, the step and the rank (global and in both groups). A failure of
the inter-node exchange, or fp16 values overflowing on the wire, is seen by one local rank only: it
goes on to the all-gather with a non-zero status, and every rank of the node raises the same error
after it (fp16 overflows are seen by the same local rank of every node, so every rank stops alike).
Reading the statuses is a host sync: it is done on CPU, and on CUDA with ``wire_dtype="fp16"`` (which
synchronises to check the range anyway); otherwise, on CUDA, the rank that saw the failure raises
at once and its node's other ranks stop in their next collective with it (the process group's
timeout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from lightning_gmc.compressors import Workspace
from lightning_gmc.hook.hierarchy import IntraNodeTraffic, NodeGroups, NodeTopology
from lightning_gmc.hook.node_checkpoint import gather_node_state
from lightning_gmc.hook.reducer import BucketWork, method_step
from lightning_gmc.methods import Method, ParameterTable, WorkerState
from lightning_gmc.methods.shards import DEFAULT_MIN_PIECE, BucketShards, ShardPlan, plan_shards
from lightning_gmc.transport import (
    CollectiveFailure,
    CommStats,
    Exchange,
    LeaderSupport,
    TorchCollectives,
    WireOverflow,
    residual_gather_bytes,
    two_level_intra_bytes,
)

__all__ = ["NodeReducer"]

_OK, _FAILED, _OVERFLOW = 0.0, 1.0, 2.0


class _NodeBucket:
    """One bucket layout seen by one rank: its shards and the buffers its collectives use."""

    def __init__(self, shards: BucketShards, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shards = shards
        self.own = shards.shard_numels[rank]
        self.positions = shards.local_positions(rank)
        chunk, ranks = shards.chunk, shards.plan.ranks_per_node
        self.stride = chunk + 1  # the shard, its padding, one status element
        self.node_sum = torch.zeros(chunk, dtype=torch.float32, device=device)
        self.gather_send = torch.zeros(self.stride, dtype=dtype, device=device)
        self.gathered = torch.empty(ranks * self.stride, dtype=dtype, device=device)

    def statuses(self) -> list[float]:
        """Every local rank's status element (a host read)."""
        return self.gathered[self.stride - 1 :: self.stride].tolist()


class NodeReducer:
    """The reducer of ``hierarchy="node"`` (module docstring).

    Args:
        stats: the traffic counters of the inter-node exchange.
        groups: this rank's topology and process groups (:func:`~lightning_gmc.hook.build_node_groups`).
        min_piece: the shard plan's smallest piece (:func:`~lightning_gmc.methods.shards.plan_shards`).
    """

    def __init__(self, stats: CommStats, groups: NodeGroups, min_piece: int = DEFAULT_MIN_PIECE) -> None:
        self.groups = groups
        self.min_piece = int(min_piece)
        self._exchange = Exchange(TorchCollectives(groups.inter), stats, groups.topology.rank_label())
        #: the error of a step whose shards kept their half-updated state (see :attr:`failure`)
        self._failed: Exception | None = None
        self._support = LeaderSupport(self._exchange.collectives, stats)
        self.intra = TorchCollectives(groups.intra)
        self.intra_traffic = IntraNodeTraffic()
        self.plan: ShardPlan | None = None
        self.method: Method | None = None
        self.worker: WorkerState | None = None
        self._buckets: dict[tuple[tuple[int, ...], torch.dtype], _NodeBucket] = {}
        self._pack_buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self._scratch = Workspace()
        self._check_status = True
        # The full residual gathered for the detached point, valid while no bucket changed it.
        self._version = 0
        self._gathered: tuple[int, list[Tensor]] | None = None

    @property
    def exchange(self) -> Exchange:
        return self._exchange

    @property
    def support(self) -> LeaderSupport:
        return self._support

    @property
    def topology_info(self) -> str:
        return self.groups.topology.rank_label()

    def attach(self, method: Method, table: ParameterTable, device: torch.device, seed: int) -> WorkerState:
        topology = self.groups.topology
        self.plan = plan_shards(table, topology.ranks_per_node, self.min_piece)
        self._buckets.clear()
        self._gathered = None
        self.method = method
        fp16_wire = any(c.value_dtype == torch.float16 for c in method.compressors())
        self._check_status = torch.device(device).type == "cpu" or fp16_wire
        # The node is the logical worker: its rank selects the private random streams.
        local = self.plan.local_table(topology.local_rank)
        self.worker = WorkerState(method, local, device, topology.node_rank, seed)
        return self.worker

    def _bucket(self, work: BucketWork) -> _NodeBucket:
        key = (work.param_indices, work.buffer.dtype)
        bucket = self._buckets.get(key)
        if bucket is None:
            assert self.plan is not None and self.worker is not None
            shards = self.plan.bucket(work.param_indices)
            bucket = _NodeBucket(
                shards, self.groups.topology.local_rank, work.buffer.dtype, self.worker.device
            )
            # DDP's rebuilt layout replaces the first iteration's: free the buffers of the old one.
            claimed = set(work.param_indices)
            for old in [k for k in self._buckets if claimed.intersection(k[0])]:
                del self._buckets[old]
            self._buckets[key] = bucket
        return bucket

    def _shared(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        """The first ``numel`` elements of a buffer every bucket uses in turn (grown to the largest)."""
        assert self.worker is not None
        buffer = self._pack_buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=self.worker.device)
            self._pack_buffers[(name, dtype)] = buffer
        return buffer[:numel]

    @property
    def workspace_bytes(self) -> int:
        """Bytes of this reducer's own buffers: per bucket layout the node sum and the all-gather's
        send and receive buffers, the pack buffers every bucket shares, and the gathered residual."""
        per_bucket = sum(
            t.numel() * t.element_size()
            for b in self._buckets.values()
            for t in (b.node_sum, b.gather_send, b.gathered)
        )
        shared = sum(t.numel() * t.element_size() for t in self._pack_buffers.values())
        return per_bucket + shared + self._scratch.nbytes

    def _failure(self, what: str, work: BucketWork, err: Exception) -> CollectiveFailure:
        return CollectiveFailure(
            f"lightning_gmc: the {what} of bucket {work.index} ({work.buffer.numel()} elements) at step "
            f"{work.step} failed on {self.topology_info}; no update was applied (a peer process probably "
            f"died or timed out): {err}"
        )

    def reduce(self, work: BucketWork) -> Future[Tensor]:
        method, worker = self.method, self.worker
        assert method is not None and worker is not None, "attach() runs before the first bucket"
        self._version += 1
        bucket = self._bucket(work)
        shards, ranks = bucket.shards, self.groups.topology.ranks_per_node
        chunk, dtype = shards.chunk, work.buffer.dtype
        element = work.buffer.element_size()
        # 1. The node's sum of this rank's shard (send and receive buffers are free again after the wait).
        send = self._shared("send", ranks * chunk, dtype)
        received = self._shared("received", ranks * chunk, dtype)
        shards.pack(work.grad, send)
        try:
            self.intra.reduce_scatter_sum([send], [bucket.node_sum], received).wait()
        except Exception as err:
            raise self._failure("intra-node reduce_scatter of the gradient", work, err) from err
        grad = bucket.node_sum[: bucket.own]
        grad.div_(ranks)  # the node's mean gradient: what the node's one worker computes with
        # 2. The method on the shard, between nodes.
        status, failure = _OK, None
        if bucket.own:
            try:
                direction = self._method_step(work, bucket, grad)
                bucket.gather_send[: bucket.own].copy_(direction)
            except Exception as err:
                status = _status_of(err)
                if status == _OK:
                    raise  # not a communication error: a bug, reported as is
                if not self._check_status:
                    raise self._failure("inter-node exchange", work, err) from err
                failure = err
        bucket.gather_send[-1:].fill_(status)
        # 3. Every shard's direction to every rank of the node. Both intra-node phases have run or are
        # issued now: count them with the formula the cost model predicts with.
        self.intra_traffic.add(two_level_intra_bytes(chunk, ranks, element))
        gathered = self.intra.all_gather([bucket.gather_send], bucket.gathered)
        buffer = work.buffer

        def finish(fut: Future[Tensor]) -> Tensor:
            try:
                fut.value()
            except Exception as err:
                raise self._failure("intra-node all_gather of the update direction", work, err) from err
            if self._check_status:
                try:
                    _raise_on_status(bucket.statuses(), work, self.groups.topology, failure)
                except (FloatingPointError, CollectiveFailure) as err:
                    self._failed = err  # the shards' state of this step is not undone
                    raise
            shards.unpack(bucket.gathered, bucket.stride, buffer)
            return buffer

        return gathered.then(finish)

    def _method_step(self, work: BucketWork, bucket: _NodeBucket, grad: Tensor) -> Tensor:
        method, worker = self.method, self.worker
        assert method is not None and worker is not None
        local_rank = self.groups.topology.local_rank
        bucket_state = worker.bucket(bucket.positions)

        def read_params(out: Tensor) -> None:
            bucket.shards.read_params(local_rank, work.params, out)

        step = method_step(worker, self.exchange, self.support, bucket_state, grad, read_params, work)
        messages = method.encode(step)
        means = self.exchange.start(
            [messages], [bucket_state], work.step, work.index, dense_element_size=work.buffer.element_size()
        ).wait()
        method.complete(step, messages, means[0])
        return step.direction()

    def check_finite(self, skipped: Tensor, bucket_index: int, num_params: int, step: int) -> None:
        """Every rank's finding for this bucket, from one all-reduce over the world: all ranks raise the
        same error before anything is exchanged, or none does."""
        topology = self.groups.topology
        flags = torch.zeros(dist.get_world_size(), dtype=torch.float32, device=skipped.device)
        flags[topology.global_rank] = skipped.to(torch.float32)
        try:
            dist.all_reduce(flags)
        except Exception as err:
            raise CollectiveFailure(
                f"lightning_gmc: the all_reduce of the non-finite flags of bucket {bucket_index} at step "
                f"{step} failed on {topology.rank_label()}: {err}"
            ) from err
        bad = [int(rank) for rank in flags.nonzero().flatten().tolist()]
        if bad:
            per_node = topology.ranks_per_node
            where = ", ".join(f"{r} (node {r // per_node}, local rank {r % per_node})" for r in bad)
            raise FloatingPointError(
                f"non-finite gradient in bucket {bucket_index} ({num_params} parameters) at step {step} on "
                f"global rank {where}; no update was applied (nonfinite='raise')"
            )

    @property
    def failure(self) -> Exception | None:
        return self._failed or self._exchange.failed

    def clear_failure(self) -> None:
        self._failed = self._exchange.failed = None

    def restore_step(self) -> None:
        # Never called: an fp16 overflow in a shard's exchange travels as the shard's status through
        # the intra-node all-gather and stops every rank with one error (the step is not undone, as it
        # is with hierarchy="flat"; docs/nodes.md).
        raise NotImplementedError("hierarchy='node' does not undo a step whose fp16 wire overflowed")

    def residuals(self) -> Sequence[Tensor] | None:
        """The node's full residual per parameter, all-gathered inside the node (counted as intra-node
        traffic) once after every step that changed it; views into one model-sized buffer."""
        worker, plan = self.worker, self.plan
        if worker is None or plan is None or "residual" not in worker.tensors:
            return None
        if self._gathered is not None and self._gathered[0] == self._version:
            return self._gathered[1]
        ranks, chunk = plan.ranks_per_node, plan.largest_share
        send = self._scratch.tensor("residual_send", chunk, torch.float32, worker.device)
        out = self._scratch.tensor("residual_gathered", ranks * chunk, torch.float32, worker.device)
        own = worker.tensors["residual"]
        if own:
            torch.cat([t.reshape(-1) for t in own], out=send[: sum(t.numel() for t in own)])
        self.intra_traffic.add(residual_gather_bytes(chunk, ranks))
        try:
            self.intra.all_gather([send], out).wait()
        except Exception as err:
            raise CollectiveFailure(
                f"lightning_gmc: the intra-node all_gather of the residual (the detached or evaluation "
                f"point) failed on {self.topology_info}: {err}"
            ) from err
        full = self._assemble(out, chunk)
        self._gathered = (self._version, full)
        return full

    def _assemble(self, out: Tensor, chunk: int) -> list[Tensor]:
        plan, worker = self.plan, self.worker
        assert plan is not None and worker is not None
        start: dict[int, int] = {}  # each piece's offset in the gathered buffer: its owner's chunk
        for rank in range(plan.ranks_per_node):
            offset = rank * chunk
            for index in plan.local_pieces(rank):
                start[index] = offset
                offset += plan.pieces[index].numel
        full: list[Tensor] = []
        for param, numel in enumerate(plan.table.numels):
            ids = plan.param_pieces(param)
            views = [out[start[i] : start[i] + plan.pieces[i].numel] for i in ids]
            if len(views) == 1:
                full.append(views[0])
            else:  # a split parameter: its pieces sit in different ranks' chunks
                joined = self._scratch.tensor(f"residual_param{param}", numel, torch.float32, worker.device)
                torch.cat(views, out=joined)
                full.append(joined)
        return full

    def state_changed(self) -> None:
        """The worker's state was loaded or reset outside a step (the gathered residual is stale)."""
        self._version += 1

    def gather_state(
        self, rank_state: dict[str, Any], training_parameters: dict[str, Tensor] | None
    ) -> dict[str, Any]:
        assert self.plan is not None, "attach() runs before a checkpoint"
        return gather_node_state(rank_state, training_parameters, self.plan)

    def to_local(self, buffers: dict[str, Any]) -> dict[str, Any]:
        """Full per-parameter buffers -> this rank's pieces (a rank state of this plan passes as is)."""
        assert self.plan is not None and self.worker is not None
        names = set(self.worker.table.names)
        if all(set(by_name) == names for by_name in buffers.values()):
            return buffers
        return self.plan.split_buffers(buffers, self.groups.topology.local_rank)

    def topology(self) -> dict[str, Any]:
        return {"hierarchy": "node", **self.groups.topology.describe()}

    def add_metrics(self, metrics: dict[str, float]) -> None:
        # The exchange's counters (``bytes_sent``) count the inter-node link here.
        metrics["bytes_sent_inter"] = metrics["bytes_sent"]
        metrics["bytes_sent_intra"] = self.intra_traffic.take_step()


def _status_of(err: Exception) -> float:
    """The status a failure of the method step sends to the node: an overflow of fp16 values, a
    failed collective, or nothing (another error, raised where it happened). Errors raised in a
    future's callback arrive as RuntimeErrors whose text starts with the original type's name."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, WireOverflow) or "WireOverflow" in text:
        return _OVERFLOW
    if isinstance(err, CollectiveFailure) or "CollectiveFailure" in text:
        return _FAILED
    return _OK


def _raise_on_status(
    statuses: Sequence[float], work: BucketWork, topology: NodeTopology, failure: Exception | None
) -> None:
    """The same error on every rank of the node when a local rank's exchange failed or overflowed."""
    overflowed = [rank for rank, status in enumerate(statuses) if status == _OVERFLOW]
    failed = [rank for rank, status in enumerate(statuses) if status == _FAILED]
    if not (overflowed or failed):
        return
    where = f"bucket {work.index} ({work.buffer.numel()} elements) at step {work.step}"
    first = topology.node_rank * topology.ranks_per_node

    def ranks(local: list[int]) -> str:
        return f"{local} of node {topology.node_rank} (global rank(s) {[first + r for r in local]})"

    # The same text on every rank of the node; the rank that saw the failure adds what it saw.
    here = "" if failure is None else f" This rank's error: {failure}"
    if overflowed:
        raise FloatingPointError(
            # Every node's same local ranks decode the same means: one text on every rank of every node.
            f"lightning_gmc: the values overflowed fp16 on the wire in the inter-node exchange of local "
            f"rank(s) {overflowed} (of every node) in {where} (a value or a sum over nodes beyond +-65504); "
            f"no update was applied to the parameters, but under hierarchy='node' the step's method state "
            f"is not restored (the state refuses to be saved): resume from the last checkpoint. Use "
            f"wire_dtype='bf16' (the range of fp32) or 'fp32'.{here}"
        ) from failure
    raise CollectiveFailure(
        f"lightning_gmc: the inter-node exchange of local rank(s) {ranks(failed)} in {where} failed; no "
        f"update was applied to the parameters (a peer process probably died or timed out); resume from "
        f"the last checkpoint.{here}"
    ) from failure
