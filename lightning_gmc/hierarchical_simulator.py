"""N nodes of G ranks in one process: ``hierarchy="node"``'s 2-D scheme, virtual ranks, the same code.

:class:`HierarchicalSimulator` runs what :class:`~lightning_gmc.hook.node_reducer.NodeReducer` runs on
every rank of a real run, with every rank in this process: the same shard plan
(:func:`~lightning_gmc.methods.shards.plan_shards`), the same shard-major packing, the same
reduce-scatter and all-gather (:class:`~lightning_gmc.transport.InProcessCollectives`, bit for bit
what the torch back-end computes) and the same exchange between nodes. A real run of N x G ranks
equals it bit for bit on CPU, which is what the equivalence tests rely on instead of launching N x G
processes for every case.

Example (2 nodes of 3 ranks; ``grad_fn(rank, point)`` is rank ``rank``'s gradient)::

    sim = HierarchicalSimulator(dict(model.named_parameters()), nodes=2, ranks_per_node=3,
                                method="gmc", compressor="topk", density=0.01)
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    for t in range(100):
        points = sim.gradient_points(w, lr=0.1)                      # one per node
        grads = [grad_fn(rank, points[rank // 3]) for rank in range(6)]
        direction = sim.step(grads, points, lr=0.1)[0]               # one per node
        w = {name: w[name] - 0.1 * direction[name] for name in w}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gmc.compressors import Compressor, WireDtype
from lightning_gmc.methods import BucketStep, Message, Method, WorkerState
from lightning_gmc.methods.shards import DEFAULT_MIN_PIECE, BucketShards, plan_shards
from lightning_gmc.simulator import Simulator
from lightning_gmc.transport import (
    CommStats,
    Exchange,
    InProcessCollectives,
    LeaderSupport,
    residual_gather_bytes,
    two_level_intra_bytes,
)

__all__ = ["HierarchicalSimulator"]


class HierarchicalSimulator(Simulator):
    """Simulate ``hierarchy="node"``: ``nodes`` workers (K = N), each node's ``ranks_per_node`` ranks
    sharing its work (module docstring).

    Args:
        params: as for :class:`~lightning_gmc.Simulator`.
        nodes: N, the method's workers.
        ranks_per_node: G.
        min_piece: the shard plan's smallest piece (``GMCHookState.set_node_groups``).
        buckets: the parameter indices of each DDP bucket, in bucket order (default: one bucket of
            every parameter). Values do not depend on it (the method and the compressors work per
            piece); the padding, hence the intra-node bytes, does.
        method, compressor, density, momentum, weight_decay, seed, ef_scaling, wire_dtype,
            method_options: as for :class:`~lightning_gmc.Simulator`.

    Attributes:
        plan: the shard plan.
        inter_stats: per local rank, the traffic counters of its exchange (one rank's view; a node's
            inter-node bytes are their sum).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor | torch.Size | Sequence[int]],
        nodes: int,
        ranks_per_node: int,
        method: str | Method = "gmc",
        compressor: str | Compressor | None = None,
        density: float = 0.01,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        seed: int = 0,
        ef_scaling: bool | None = None,
        wire_dtype: WireDtype = "fp32",
        min_piece: int = DEFAULT_MIN_PIECE,
        buckets: Sequence[Sequence[int]] | None = None,
        **method_options: Any,
    ) -> None:
        self.ranks_per_node = ranks_per_node
        self._min_piece = min_piece
        super().__init__(
            params,
            nodes,
            method,
            compressor,
            density,
            momentum,
            weight_decay,
            seed,
            ef_scaling,
            wire_dtype,
            **method_options,
        )
        self.nodes = nodes
        every = tuple(range(len(self.table)))
        self.buckets = [tuple(b) for b in buckets] if buckets is not None else [every]
        if sorted(i for b in self.buckets for i in b) != list(every):
            raise ValueError("buckets must hold every parameter index exactly once")
        self._shards = [self.plan.bucket(b) for b in self.buckets]
        self.intra = InProcessCollectives(ranks_per_node)
        self.inter_stats = [CommStats() for _ in range(ranks_per_node)]
        self.exchanges = [Exchange(InProcessCollectives(nodes), stats) for stats in self.inter_stats]
        self.supports = [
            LeaderSupport(e.collectives, s) for e, s in zip(self.exchanges, self.inter_stats, strict=True)
        ]
        self.exchange = self.exchanges[0]
        self._intra_bytes = 0.0

    def _build_workers(self, seed: int) -> list[WorkerState]:
        # Rank (n, l) holds node n's state of local rank l's pieces; node n's rank picks its streams.
        self.plan = plan_shards(self.table, self.ranks_per_node, self._min_piece)
        device = torch.device("cpu")
        self.shard_workers = [
            [
                WorkerState(self.method, self.plan.local_table(lr), device, node, seed)
                for lr in range(self.ranks_per_node)
            ]
            for node in range(self.num_workers)
        ]
        return []

    def _residuals(self, worker: int) -> list[Tensor]:
        plan, shards = self.plan, self.shard_workers[worker]
        full = []
        for param in range(len(self.table)):
            parts = [
                shards[plan.pieces[i].owner].tensors["residual"][plan.position(i)]
                for i in plan.param_pieces(param)
            ]
            full.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return full

    def worker_state(self, worker: int) -> dict[str, dict[str, Tensor]]:
        return self.plan.merge_buffers([shard.state_dict() for shard in self.shard_workers[worker]])

    def load_worker_state(self, worker: int, state: dict[str, dict[str, Tensor]]) -> None:
        for local_rank, shard in enumerate(self.shard_workers[worker]):
            shard.load_state_dict(self.plan.split_buffers(state, local_rank))

    def take_intra_bytes(self) -> float:
        """Bytes each rank sent inside its node since the last call (every rank sends the same)."""
        sent, self._intra_bytes = self._intra_bytes, 0.0
        return sent

    def gradient_points(self, params: Mapping[str, Tensor], lr: float) -> list[dict[str, Tensor]]:
        """Each node's gradient point (:meth:`Simulator.gradient_points`); a detached point costs an
        all-gather of the residual inside the node, counted as the real run counts it."""
        if self.method.detach_scale(self._hyper(lr)) and "residual" in self.method.buffers:
            self._intra_bytes += residual_gather_bytes(self.plan.largest_share, self.ranks_per_node)
        return super().gradient_points(params, lr)

    def step(
        self,
        grads: Sequence[Mapping[str, Tensor]],
        points: Sequence[Mapping[str, Tensor]],
        lr: float,
    ) -> list[dict[str, Tensor]]:
        """One step of every rank: ``grads[r]`` is rank ``r``'s gradient (``r = node * G + local``),
        ``points[n]`` node ``n``'s gradient point; returns each node's update direction."""
        nodes, ranks = self.nodes, self.ranks_per_node
        if len(grads) != nodes * ranks or len(points) != nodes:
            raise ValueError(
                f"expected {nodes * ranks} gradients (one per rank) and {nodes} points (one per node)"
            )
        flat_grads = [self._flat(g) for g in grads]
        flat_points = [
            [p[name].detach().reshape(-1).to(torch.float32) for name in self.table.names] for p in points
        ]
        offsets = [0]
        for numel in self.table.numels:
            offsets.append(offsets[-1] + numel)
        directions = [torch.empty(offsets[-1]) for _ in range(nodes)]
        for index, (layout, shards) in enumerate(zip(self.buckets, self._shards, strict=True)):
            spans = [(offsets[p], offsets[p + 1]) for p in layout]
            bucket_dirs = self._bucket_step(
                index, shards, [_gather(g, spans) for g in flat_grads], flat_points, lr
            )
            for node, bucket_dir in enumerate(bucket_dirs):
                position = 0
                for start, stop in spans:
                    directions[node][start:stop] = bucket_dir[position : position + stop - start]
                    position += stop - start
        self._prev_lr = float(lr)
        self.step_index += 1
        return [self._unflatten(d) for d in directions]

    def _bucket_step(
        self,
        index: int,
        shards: BucketShards,
        grads: list[Tensor],
        points: list[list[Tensor]],
        lr: float,
    ) -> list[Tensor]:
        nodes, ranks, chunk = self.nodes, self.ranks_per_node, shards.chunk
        # 1. Inside each node: the reduce-scatter of the shard-major bucket, then the mean.
        sums = [[torch.zeros(chunk) for _ in range(ranks)] for _ in range(nodes)]
        for node in range(nodes):
            sends = []
            for local_rank in range(ranks):
                send = torch.empty(ranks * chunk)
                shards.pack(grads[node * ranks + local_rank], send)
                sends.append(send)
            self.intra.reduce_scatter_sum(sends, sums[node])
            for local_rank in range(ranks):
                sums[node][local_rank][: shards.shard_numels[local_rank]].div_(ranks)
        self._intra_bytes += two_level_intra_bytes(chunk, ranks, element_size=4)  # fp32 buckets
        # 2. Between nodes: local rank l's method step on its shard, K = N workers.
        hyper = self._hyper(lr)
        sent = [[torch.zeros(chunk + 1) for _ in range(ranks)] for _ in range(nodes)]
        for local_rank in range(ranks):
            own = shards.shard_numels[local_rank]
            if not own:
                continue
            steps: list[BucketStep | None] = [None] * nodes
            messages: list[list[Message]] = [[] for _ in range(nodes)]
            for node in self._encode_order():
                worker = self.shard_workers[node][local_rank]
                grad = sums[node][local_rank][:own]
                step = BucketStep(
                    bucket=worker.bucket(shards.local_positions(local_rank)),
                    grad=grad,
                    out=grad,
                    hypers=[hyper],
                    step=self.step_index,
                    rng=worker.rng,
                    world_size=nodes,
                    read_params=_shard_reader(shards, local_rank, points[node]),
                    agree_support=self.supports[local_rank].bind(self.step_index, node, index),
                )
                messages[node] = self.method.encode(step)
                steps[node] = step
            done = [step for step in steps if step is not None]
            exchange = self.exchanges[local_rank]
            means = exchange.start(messages, [s.bucket for s in done], self.step_index, index).wait()
            for node, (step, own_means) in enumerate(zip(done, means, strict=True)):
                self.method.complete(step, messages[node], own_means)
                sent[node][local_rank][:own].copy_(step.direction())
        # 3. Inside each node: the all-gather of the directions.
        out = []
        for node in range(nodes):
            gathered = torch.empty(ranks * (chunk + 1))
            self.intra.all_gather(sent[node], gathered)
            bucket_dir = torch.empty(shards.numel)
            shards.unpack(gathered, chunk + 1, bucket_dir)
            out.append(bucket_dir)
        return out


def _gather(flat: Tensor, spans: Sequence[tuple[int, int]]) -> Tensor:
    """A bucket's vector, from a vector of the whole model (the bucket's parameters in bucket order)."""
    return torch.cat([flat[start:stop] for start, stop in spans])


def _shard_reader(shards: BucketShards, local_rank: int, point: list[Tensor]) -> Callable[[Tensor], None]:
    def read(out: Tensor) -> None:
        shards.read_flat(local_rank, point, out)

    return read
