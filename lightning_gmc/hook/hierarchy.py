"""Node-aware hierarchy: dense averaging inside a node, the method between nodes only.

With ``hierarchy="node"`` (``docs/algorithms.md`` section 3.11) a run of N nodes with G ranks each is,
for the method, a run of K = N logical workers (one per node; residuals and momentum per node):

1. the G ranks of a node average their bucket gradient densely over the *intra-node* group (the
   fast link);
2. every parameter has a fixed owner local rank (:func:`assign_owners`, chosen once from the model,
   so DDP's bucket rebuild never moves state); local rank ``l`` runs the method on the parameters
   of the bucket it owns, against local rank ``l`` of every other node (G *inter-node* groups, so
   every NIC carries 1/G of the model);
3. the owners share the update and the method's new state back inside the node (each writes its
   slices into a zeroed bucket-sized buffer, an intra-node all-reduce sums them: exact, the others
   add zeros), so every rank of a node holds the node's full state and identical parameters.

A run then equals the K = N simulator fed each node's mean gradient, bit for bit on CPU. Ranks are
numbered the way Lightning, torchrun and SLURM number them: ``rank = node_rank * G + local_rank``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from lightning_gmc.hook.reducer import BucketWork, method_step
from lightning_gmc.methods import Method, ParameterTable, WorkerState
from lightning_gmc.transport import CommStats, Exchange, LeaderSupport, TorchCollectives, ring_allreduce_bytes

__all__ = [
    "IntraNodeTraffic",
    "NodeGroups",
    "NodeLayout",
    "NodeReducer",
    "NodeTopology",
    "assign_owners",
    "build_node_groups",
    "check_topology",
]


@dataclass(frozen=True)
class NodeTopology:
    """Where this rank sits: ``num_nodes`` nodes of ``ranks_per_node`` ranks each."""

    num_nodes: int
    ranks_per_node: int
    node_rank: int
    local_rank: int

    def describe(self) -> dict[str, int]:
        """What a checkpoint records (resuming on another topology follows the world-size policy)."""
        return {"num_nodes": self.num_nodes, "ranks_per_node": self.ranks_per_node}

    def rank_label(self) -> str:
        """How error messages name this rank: its global rank and its place (the exchange's group
        numbers it by node)."""
        rank = self.node_rank * self.ranks_per_node + self.local_rank
        return (
            f"global rank {rank} (node {self.node_rank}, local rank {self.local_rank}; rank "
            f"{self.node_rank} of the inter-node group)"
        )


@dataclass(frozen=True)
class NodeGroups:
    """This rank's topology and its two process groups.

    Attributes:
        topology: node count, ranks per node, this rank's node and local rank.
        intra: the ranks of this node.
        inter: local rank ``topology.local_rank`` of every node (the method's K = N workers).
    """

    topology: NodeTopology
    intra: dist.ProcessGroup
    inter: dist.ProcessGroup


def check_topology(world_size: int, ranks_per_node: int, num_nodes: int | None = None) -> int:
    """The number of nodes, or a ValueError naming the fix for a topology the hierarchy cannot run."""
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
    if world_size % ranks_per_node or (num_nodes is not None and num_nodes * ranks_per_node != world_size):
        raise ValueError(
            f"hierarchy='node' needs the same number of ranks on every node: the world has {world_size} "
            f"ranks, which is not {num_nodes or 'N'} nodes x {ranks_per_node} ranks. Start the same "
            f"number of processes (devices) on every node, or use hierarchy='flat'."
        )
    nodes = world_size // ranks_per_node
    if nodes < 2:
        raise ValueError(
            f"hierarchy='node' needs at least 2 nodes, the run has {nodes} node of {ranks_per_node} ranks "
            f"(the method would see K = 1 worker and compress for nothing). Use hierarchy='flat'."
        )
    return nodes


def build_node_groups(ranks_per_node: int, num_nodes: int | None = None) -> NodeGroups:
    """Create the intra- and inter-node process groups (a collective: call on every rank).

    Every rank creates every group, in the same order, as ``dist.new_group`` requires; the default
    process group must exist. For plain DDP::

        dist.init_process_group("nccl")
        state = GMCHookState.from_config(GMCConfig(hierarchy="node", compressor="topk"))
        state.set_node_groups(build_node_groups(ranks_per_node=torch.cuda.device_count()))
        state.attach(model, optimizer)

    Raises:
        ValueError: unequal ranks per node or a single node (:func:`check_topology`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_node_groups() needs the default process group (init_process_group first)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    nodes = check_topology(world_size, ranks_per_node, num_nodes)
    node_rank, local_rank = divmod(rank, ranks_per_node)
    intra = [dist.new_group([n * ranks_per_node + lr for lr in range(ranks_per_node)]) for n in range(nodes)]
    inter = [dist.new_group([n * ranks_per_node + lr for n in range(nodes)]) for lr in range(ranks_per_node)]
    topology = NodeTopology(nodes, ranks_per_node, node_rank, local_rank)
    mine_intra, mine_inter = intra[node_rank], inter[local_rank]
    # new_group returns a sentinel (not a group) to ranks outside it; this rank is in both of these.
    assert isinstance(mine_intra, dist.ProcessGroup) and isinstance(mine_inter, dist.ProcessGroup)
    return NodeGroups(topology, mine_intra, mine_inter)


def assign_owners(table: ParameterTable, ranks_per_node: int) -> tuple[int, ...]:
    """The local rank that runs the method on each parameter: contiguous runs in parameter order,
    balanced by element count (a parameter goes to the share its midpoint falls in)."""
    total = max(table.numel, 1)
    owners = []
    before = 0
    for numel in table.numels:
        owners.append(min(ranks_per_node - 1, (2 * before + numel) * ranks_per_node // (2 * total)))
        before += numel
    return tuple(owners)


class NodeLayout:
    """One DDP bucket seen by one local rank: which of its parameters the rank owns, where they sit
    in the bucket and in the owned workspace, and the share-back buffer.

    Args:
        param_indices: the bucket's parameters (global indices, in bucket order).
        numels: element count of every parameter of the model.
        owners: the owner local rank of every parameter.
        local_rank: this rank's local rank.
        num_buffers: how many state buffers the method keeps (shared back after the update).
        device: where the bucket lives.
    """

    def __init__(
        self,
        param_indices: Sequence[int],
        numels: Sequence[int],
        owners: Sequence[int],
        local_rank: int,
        num_buffers: int,
        device: torch.device,
    ) -> None:
        self.param_indices = tuple(param_indices)
        self.offsets: list[int] = []
        offset = 0
        for index in self.param_indices:
            self.offsets.append(offset)
            offset += numels[index]
        self.numel = offset
        self.numels = [numels[i] for i in self.param_indices]
        owned = [pos for pos, index in enumerate(self.param_indices) if owners[index] == local_rank]
        self.owned_positions = tuple(owned)
        self.owned_indices = tuple(self.param_indices[pos] for pos in owned)
        # (bucket offset, owned offset, length) runs: adjacent owned parameters copy in one slice.
        self.runs: list[tuple[int, int, int]] = []
        sub = 0
        for pos in owned:
            full, length = self.offsets[pos], self.numels[pos]
            if self.runs and self.runs[-1][0] + self.runs[-1][2] == full:
                start, sub_start, run = self.runs[-1]
                self.runs[-1] = (start, sub_start, run + length)
            else:
                self.runs.append((full, sub, length))
            sub += length
        # Section 0: the update direction; section 1 + b: the method's b-th state buffer.
        self.share = torch.zeros((1 + num_buffers) * self.numel, dtype=torch.float32, device=device)

    def gather(self, bucket_vector: Tensor, owned: Tensor) -> None:
        """Copy the owned parameters' slices of a bucket-sized vector into an owned-sized one."""
        for full, sub, length in self.runs:
            owned[sub : sub + length].copy_(bucket_vector[full : full + length])

    def section(self, index: int) -> Tensor:
        return self.share[index * self.numel : (index + 1) * self.numel]

    def scatter(self, owned: Tensor, section: int) -> None:
        """Write an owned-sized vector into its slots of a share-back section (the rest stays zero)."""
        target = self.section(section)
        for full, sub, length in self.runs:
            target[full : full + length].copy_(owned[sub : sub + length])


class IntraNodeTraffic:
    """Bytes this rank sends inside its node (ring model), per step and over the run."""

    def __init__(self) -> None:
        self.bytes_sent = 0.0
        self.bytes_sent_total = 0.0
        self._lock = threading.Lock()

    def record_allreduce(self, nbytes: int, ranks_per_node: int) -> None:
        with self._lock:
            self.bytes_sent += ring_allreduce_bytes(nbytes, ranks_per_node) if ranks_per_node > 1 else 0.0

    def take_step(self) -> float:
        with self._lock:
            sent, self.bytes_sent = self.bytes_sent, 0.0
            self.bytes_sent_total += sent
            return sent

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class NodeReducer:
    """The reducer of ``hierarchy="node"`` (module docstring): the node mean, the method on the owned
    parameters against the other nodes, and the share-back inside the node.

    The node mean and the inter-node exchange are waited for in :meth:`reduce`: every collective is
    then issued in the caller's thread, in the same order on every rank (a collective issued from a
    future's callback would run on the back-end's completion thread). Only the share-back all-reduce
    is left in flight; its callback copies the result, locally.

    Args:
        stats: the traffic counters of the inter-node exchange.
        groups: this rank's topology and process groups (:func:`build_node_groups`).
    """

    def __init__(self, stats: CommStats, groups: NodeGroups) -> None:
        self.groups = groups
        self._exchange = Exchange(TorchCollectives(groups.inter), stats, groups.topology.rank_label())
        self._support = LeaderSupport(self._exchange.collectives, stats)
        self.intra_traffic = IntraNodeTraffic()
        #: owner local rank of every parameter, fixed at attach
        self.owners: tuple[int, ...] = ()
        self._layouts: dict[tuple[int, ...], NodeLayout] = {}
        self.method: Method | None = None
        self.worker: WorkerState | None = None

    @property
    def exchange(self) -> Exchange:
        return self._exchange

    @property
    def support(self) -> LeaderSupport:
        return self._support

    def attach(self, method: Method, table: ParameterTable, device: torch.device, seed: int) -> WorkerState:
        topology = self.groups.topology
        self.owners = assign_owners(table, topology.ranks_per_node)
        self._layouts.clear()
        self.method = method
        # The node is the logical worker: its rank selects the private random streams.
        self.worker = WorkerState(method, table, device, topology.node_rank, seed)
        return self.worker

    def layout(self, param_indices: tuple[int, ...]) -> NodeLayout:
        """This rank's view of a bucket (built once per bucket layout)."""
        layout = self._layouts.get(param_indices)
        if layout is None:
            assert self.method is not None and self.worker is not None
            layout = NodeLayout(
                param_indices,
                self.worker.table.numels,
                self.owners,
                self.groups.topology.local_rank,
                len(self.method.buffers),
                self.worker.device,
            )
            self._layouts[param_indices] = layout
        return layout

    def reduce(self, work: BucketWork) -> Future[Tensor]:
        method, worker, groups = self.method, self.worker, self.groups
        assert method is not None and worker is not None, "attach() runs before the first bucket"
        grad, buffer = work.grad, work.buffer
        layout = self.layout(work.param_indices)
        ranks_per_node = groups.topology.ranks_per_node
        self.intra_traffic.record_allreduce(grad.numel() * grad.element_size(), ranks_per_node)
        dist.all_reduce(grad, group=groups.intra)
        grad.div_(ranks_per_node)  # the node's mean gradient: what the node's one worker computes with
        layout.share.zero_()
        if layout.owned_indices:
            bucket_state = worker.bucket(layout.owned_indices)
            owned = bucket_state.workspace("node_grad")
            layout.gather(grad, owned)
            owned_params = [work.params[pos] for pos in layout.owned_positions]
            step = method_step(worker, self.exchange, self.support, bucket_state, owned, owned_params, work)
            messages = method.encode(step)
            means = self.exchange.start([messages], [bucket_state], work.step, work.index).wait()
            method.decode(step, means[0])
            layout.scatter(step.direction(), 0)  # owned, or the state buffer holding the direction
            for section, name in enumerate(method.buffers, start=1):
                layout.scatter(bucket_state.buffers[name], section)
        self.intra_traffic.record_allreduce(layout.share.numel() * 4, ranks_per_node)
        pending = dist.all_reduce(layout.share, group=groups.intra, async_op=True)
        assert pending is not None

        def finish(fut: Future[list[Tensor]]) -> Tensor:
            fut.value()  # re-raises a failed share-back
            # Every rank of the node, owners included, takes the summed buffer: identical state everywhere.
            buffer.copy_(layout.section(0))
            for section, name in enumerate(method.buffers, start=1):
                summed, per_param = layout.section(section), worker.tensors[name]
                slots = zip(layout.param_indices, layout.offsets, layout.numels, strict=True)
                for index, offset, numel in slots:
                    per_param[index].copy_(summed[offset : offset + numel])
            return buffer

        return pending.get_future().then(finish)

    def topology(self) -> dict[str, Any]:
        return {"hierarchy": "node", **self.groups.topology.describe()}

    def add_metrics(self, metrics: dict[str, float]) -> None:
        # The exchange's counters (``bytes_sent``) count the inter-node link here.
        metrics["bytes_sent_inter"] = metrics["bytes_sent"]
        metrics["bytes_sent_intra"] = self.intra_traffic.take_step()
