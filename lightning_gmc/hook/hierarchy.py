"""Node-aware hierarchy: where a rank sits, its process groups, and its intra-node traffic.

With ``hierarchy="node"`` (``docs/algorithms.md`` section 3.11) a run of N nodes with G ranks each is,
for the method, a run of K = N logical workers (one per node). Per DDP bucket, the
:class:`~lightning_gmc.hook.node_reducer.NodeReducer` runs the standard 2-D scheme:

1. an intra-node **reduce-scatter** leaves local rank ``l`` the node's mean gradient of its shard of
   the bucket (the :mod:`shard plan <lightning_gmc.methods.shards>`, fixed at attach);
2. local rank ``l`` runs the method on its shard with K = N workers, against local rank ``l`` of every
   other node (G inter-node groups, so every NIC carries 1/G of each bucket);
3. an intra-node **all-gather** of the update direction gives every rank of the node the whole bucket.

Method state is sharded the same way: each rank holds 1/G of its node's. Ranks are numbered the way
Lightning, torchrun and SLURM number them: ``rank = node_rank * G + local_rank``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "IntraNodeTraffic",
    "NodeGroups",
    "NodeTopology",
    "build_node_groups",
    "check_topology",
    "default_group_timeout",
]


@dataclass(frozen=True)
class NodeTopology:
    """Where this rank sits: ``num_nodes`` nodes of ``ranks_per_node`` ranks each."""

    num_nodes: int
    ranks_per_node: int
    node_rank: int
    local_rank: int

    @property
    def global_rank(self) -> int:
        return self.node_rank * self.ranks_per_node + self.local_rank

    def describe(self) -> dict[str, int]:
        """What a checkpoint records (resuming on another topology: ``GMCHookState.load_state_dict``)."""
        return {"num_nodes": self.num_nodes, "ranks_per_node": self.ranks_per_node}

    def rank_label(self) -> str:
        """How error messages name this rank: its global rank and its place (its rank in the
        intra-node group is its local rank; the exchange's inter-node group numbers it by node)."""
        return (
            f"global rank {self.global_rank} (node {self.node_rank}, local rank {self.local_rank}; rank "
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


def default_group_timeout() -> timedelta | None:
    """The timeout the default process group was created with (None if the back-end does not say)."""
    world = dist.group.WORLD
    if world is None:
        return None
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    try:
        timeout = world._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return None
    return timeout if isinstance(timeout, timedelta) else None


def build_node_groups(ranks_per_node: int, num_nodes: int | None = None) -> NodeGroups:
    """Create the intra- and inter-node process groups (a collective: call on every rank).

    Every rank creates every group, in the same order, as ``dist.new_group`` requires; the default
    process group must exist. The groups use its back-end and its timeout (``new_group`` would
    otherwise give them the back-end's default, 30 minutes for gloo, whatever the user chose). For
    plain DDP::

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
    timeout = default_group_timeout()

    def group(ranks: list[int]) -> dist.ProcessGroup | int:
        return dist.new_group(ranks, timeout=timeout)

    intra = [group([n * ranks_per_node + lr for lr in range(ranks_per_node)]) for n in range(nodes)]
    inter = [group([n * ranks_per_node + lr for n in range(nodes)]) for lr in range(ranks_per_node)]
    topology = NodeTopology(nodes, ranks_per_node, node_rank, local_rank)
    mine_intra, mine_inter = intra[node_rank], inter[local_rank]
    # new_group returns a sentinel (not a group) to ranks outside it; this rank is in both of these.
    assert isinstance(mine_intra, dist.ProcessGroup) and isinstance(mine_inter, dist.ProcessGroup)
    return NodeGroups(topology, mine_intra, mine_inter)


class IntraNodeTraffic:
    """Bytes this rank sends inside its node per step and over the run. The reducer adds what
    :func:`~lightning_gmc.transport.two_level_intra_bytes` and
    :func:`~lightning_gmc.transport.residual_gather_bytes` give for each collective it runs (the
    formulas the cost model predicts with)."""

    def __init__(self) -> None:
        self.bytes_sent = 0.0
        self.bytes_sent_total = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: float) -> None:
        """Count ``nbytes`` sent by this rank inside the node."""
        with self._lock:
            self.bytes_sent += float(nbytes)

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
