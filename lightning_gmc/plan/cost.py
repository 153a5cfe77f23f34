"""The cost model: predicted step time of every arm, and the link rate at which compression stops paying.

A step of an arm takes (``docs/planner.md`` derives and validates it)::

    step = compute + pipeline + max(0, comm - overlap * compute)

* ``compute``: forward, backward and optimizer step of the model on one rank (given, or measured);
  equal for every arm.
* ``pipeline``: what the arm's hook adds on the rank (:func:`~lightning_gmc.plan.profile.pipeline_seconds`,
  per-element costs of a :class:`~lightning_gmc.plan.profile.DeviceProfile`).
* ``comm``: the bytes of :func:`~lightning_gmc.plan.traffic.arm_traffic` over the links, plus a fixed
  cost per collective. Flat, a ring over all ranks crosses each node boundary once per ring, so a
  node's inter-node link carries a rank's bytes (``bytes_sent``) and the slower of the inter-node
  rate (per node) and the intra-node rate (per rank) bounds the ring. Under ``hierarchy="node"`` the
  intra-node phases (reduce-scatter, all-gather) and the inter-node exchange of the node's G shards
  run one after the other. A collective costs ``latency + hops * link latency``, with ``2 log2 K`` hops
  for an all-reduce and ``log2 K`` for an all-gather or a broadcast (tree-like, as NCCL's; gloo's ring
  at K = 2 has the same count).
* ``overlap``: the fraction of compute that communication can hide under (DDP's buckets overlap
  the backward pass); 0 adds every byte's time to the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from lightning_gmc.plan.profile import DeviceProfile, pipeline_seconds
from lightning_gmc.plan.traffic import Arm, Traffic, arm_traffic

__all__ = ["Cluster", "Prediction", "comm_seconds", "crossover_bps", "plan", "predict"]

#: TCP over Ethernet at MTU 1500: 1448 payload bytes per 1514-byte frame (timestamps on)
TCP_ETHERNET_EFFICIENCY = 1448 / 1514


@dataclass(frozen=True)
class Cluster:
    """Where the run happens.

    Attributes:
        nodes: N.
        ranks_per_node: G.
        inter_bps: bits per second one node can send to the others (all its NICs together).
        intra_bps: bits per second one rank can send inside its node (NVLink, or shared memory).
        inter_latency_s: latency of one hop between nodes.
        intra_latency_s: latency of one hop inside a node.
        efficiency: the share of a link's rate that carries payload (framing, headers).
    """

    nodes: int = 2
    ranks_per_node: int = 1
    inter_bps: float = 1e9
    intra_bps: float = 1e12
    inter_latency_s: float = 2e-5
    intra_latency_s: float = 2e-6
    efficiency: float = TCP_ETHERNET_EFFICIENCY

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(frozen=True)
class Prediction:
    """One arm's predicted step (seconds) and its traffic."""

    arm: Arm
    step_s: float
    compute_s: float
    pipeline_s: float
    comm_s: float
    traffic: Traffic
    #: inter-node rate (bits/s) below which the arm is faster than DDP; inf: at every rate, 0: never
    crossover_bps: float | None = None


def _hops(kind: str, workers: int) -> float:
    if workers <= 1:
        return 0.0
    levels = math.ceil(math.log2(workers))
    return 2.0 * levels if kind == "allreduce" else float(levels)


def comm_seconds(traffic: Traffic, cluster: Cluster, profile: DeviceProfile) -> float:
    """Seconds one step's collectives take on the cluster's links (module docstring)."""
    eta = cluster.efficiency
    workers = traffic.workers
    nodes, per_node = cluster.nodes, cluster.ranks_per_node
    if traffic.intra_bytes > 0:  # the 2-D reducer: intra phases, then the node's inter exchange
        intra = 8 * traffic.intra_bytes / (eta * cluster.intra_bps)
        intra += traffic.intra_collectives * (
            profile.collective_latency_s + _hops("allgather", per_node) * cluster.intra_latency_s
        )
        inter = 8 * traffic.inter_node_bytes / (eta * cluster.inter_bps)
        inter += sum(
            count * (profile.collective_latency_s + _hops(kind, workers) * cluster.inter_latency_s)
            for kind, count in traffic.collectives.items()
        )
        return intra + inter
    if workers <= 1:
        return 0.0
    if nodes > 1:
        rate = min(cluster.inter_bps, cluster.intra_bps) if per_node > 1 else cluster.inter_bps
        hop = cluster.inter_latency_s
    else:
        rate, hop = cluster.intra_bps, cluster.intra_latency_s
    seconds = 8 * traffic.bytes_sent / (eta * rate)
    for kind, count in traffic.collectives.items():
        seconds += count * (profile.collective_latency_s + _hops(kind, workers) * hop)
    return seconds


def predict(
    arm: Arm,
    numels: Sequence[int],
    cluster: Cluster,
    compute_s: float,
    profile: DeviceProfile,
    buckets: Sequence[Sequence[int]] | None = None,
    overlap: float = 0.0,
    traffic: Traffic | None = None,
) -> Prediction:
    """The predicted step of one arm (module docstring); ``traffic`` skips recomputing it."""
    if traffic is None:
        traffic = arm_traffic(arm, numels, buckets, cluster.nodes, cluster.ranks_per_node)
    pipeline = pipeline_seconds(profile, arm, traffic, cluster.ranks_per_node)
    comm = comm_seconds(traffic, cluster, profile)
    step = compute_s + pipeline + max(0.0, comm - overlap * compute_s)
    return Prediction(arm, step, compute_s, pipeline, comm, traffic)


def crossover_bps(
    arm: Prediction, ddp: Prediction, cluster: Cluster, profile: DeviceProfile, overlap: float = 0.0
) -> float:
    """The inter-node rate (bits/s) at which ``arm`` and DDP take equal time (bisection in log rate
    over 1 kbit/s .. 100 Tbit/s; the intra-node rate stays). ``inf``: the arm is faster at every rate;
    0: at none."""

    def gap(bps: float) -> float:
        at = replace(cluster, inter_bps=bps) if cluster.nodes > 1 else replace(cluster, intra_bps=bps)
        mine = predict(arm.arm, [], at, arm.compute_s, profile, overlap=overlap, traffic=arm.traffic)
        theirs = predict(ddp.arm, [], at, ddp.compute_s, profile, overlap=overlap, traffic=ddp.traffic)
        return mine.step_s - theirs.step_s

    low, high = math.log(1e3), math.log(1e14)
    if gap(math.exp(low)) >= 0:
        return 0.0
    if gap(math.exp(high)) < 0:
        return math.inf
    for _ in range(60):
        mid = (low + high) / 2
        if gap(math.exp(mid)) < 0:
            low = mid
        else:
            high = mid
    return math.exp((low + high) / 2)


def plan(
    numels: Sequence[int],
    cluster: Cluster,
    compute_s: float,
    profile: DeviceProfile,
    arms: Sequence[Arm],
    buckets: Sequence[Sequence[int]] | None = None,
    overlap: float = 0.0,
) -> list[Prediction]:
    """Every arm's prediction with its crossover rate, fastest first (DDP is always included).

    Args:
        numels: elements of every trainable parameter, in the model's order.
        cluster: nodes, ranks per node, links.
        compute_s: forward + backward + optimizer step per rank, seconds.
        profile: per-element costs of the device.
        arms: the settings to compare (:func:`~lightning_gmc.plan.arms.default_arms`).
        buckets: DDP's buckets (:func:`~lightning_gmc.plan.traffic.ddp_buckets`); None: one bucket.
        overlap: fraction of compute that communication can hide under.
    """
    if not any(a.method == "ddp" for a in arms):
        arms = [Arm("ddp"), *arms]
    predictions = [predict(a, numels, cluster, compute_s, profile, buckets, overlap) for a in arms]
    ddp = next(p for p in predictions if p.arm.method == "ddp")
    out = [
        replace(p, crossover_bps=None if p is ddp else crossover_bps(p, ddp, cluster, profile, overlap))
        for p in predictions
    ]
    return sorted(out, key=lambda p: p.step_s)
