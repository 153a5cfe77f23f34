"""Gathered checkpoints across topologies: one format, whatever the hierarchy.

A gathered checkpoint (``lightning_gmc.hook.codec``) holds full per-parameter tensors: the shared
buffers once, and in ``per_rank_local[r]`` the local buffers of the *worker* rank ``r`` belongs to (a
rank under ``hierarchy="flat"``, its node under ``"node"``) with rank ``r``'s traffic totals. Under
the node hierarchy each rank holds only its shard of its node's state, so saving merges the shards
(:func:`gather_node_state`) and loading splits them (``ShardPlan.split_buffers``).

Workers are what a resume preserves (:func:`select_worker_entry`): a checkpoint of K workers resumes
any topology with K workers, worker ``k`` taking worker ``k``'s residuals. So flat with N ranks <->
N nodes of any G, and N x G <-> N x G', keep every residual; a change of K follows the
``on_world_size_change`` policy (an error, or zero residuals).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor

from lightning_gmc.config import WorldSizeChangePolicy
from lightning_gmc.hook import codec
from lightning_gmc.methods.shards import ShardPlan

__all__ = ["gather_node_state", "select_worker_entry", "workers_of"]

log = logging.getLogger(__name__)


def gather_node_state(
    rank_state: dict[str, Any], training_parameters: dict[str, Tensor] | None, plan: ShardPlan
) -> dict[str, Any]:
    """The gathered block of a ``hierarchy="node"`` run (a collective over the default group).

    Every rank sends its shards (local and shared buffers) once; every rank merges them per node, so
    what each receives is one copy of every node's state (N model-sized sets, not N x G). The entries
    of a node's ranks share one merged dict (saved once by ``torch.save``).
    """
    ranks_per_node = plan.ranks_per_node
    mine: dict[str, Any] = {
        "buffers": rank_state["local"],
        "shared": rank_state["shared"],
        "stats": rank_state["stats"],
    }
    if training_parameters is not None:
        mine["training_parameters"] = training_parameters
    world_size = dist.get_world_size()
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    nodes = world_size // ranks_per_node
    merged = [
        plan.merge_buffers([gathered[n * ranks_per_node + lr]["buffers"] for lr in range(ranks_per_node)])
        for n in range(nodes)
    ]
    state = {key: value for key, value in rank_state.items() if key != "local"}
    # Shared buffers are equal on every node: node 0's shards make the whole.
    state["shared"] = plan.merge_buffers([gathered[lr]["shared"] for lr in range(ranks_per_node)])
    entries = []
    for rank, sent in enumerate(gathered):
        entry: dict[str, Any] = {"buffers": merged[rank // ranks_per_node], "stats": sent["stats"]}
        if "training_parameters" in sent:
            entry["training_parameters"] = sent["training_parameters"]
        entries.append(entry)
    state["world_size"] = world_size
    state["per_rank_local"] = entries
    return state


def workers_of(topology: Mapping[str, Any], world_size: int) -> tuple[int, int]:
    """``(K, ranks per worker)`` of a topology record: flat runs have one worker per rank, node runs
    one per node."""
    if topology.get("hierarchy") == "node":
        per_node = int(topology["ranks_per_node"])
        return world_size // per_node, per_node
    return world_size, 1


def select_worker_entry(
    block: Mapping[str, Any],
    current: Mapping[str, Any],
    rank: int,
    world_size: int,
    policy: WorldSizeChangePolicy,
) -> dict[str, Any] | None:
    """This rank's entry of a gathered checkpoint written by any topology (module docstring): its
    worker's full local buffers (and training parameters), or None when residuals reset.

    Same topology: rank ``r`` takes entry ``r`` (its own traffic totals too). Another topology with
    the same number of workers K: worker ``k``'s buffers (the entry of its first rank); traffic totals
    then come from the checkpoint's top level. Another K: the ``on_world_size_change`` policy.
    """
    saved = block.get("topology", {"hierarchy": "flat"})
    if dict(saved) == dict(current):
        return codec.select_rank_local(block, rank, world_size, policy)
    saved_world = int(block["world_size"])
    saved_workers, saved_per_worker = workers_of(saved, saved_world)
    workers, per_worker = workers_of(current, world_size)
    if saved_workers != workers:
        if policy == "error":
            raise RuntimeError(
                f"the checkpoint was written by {saved_workers} workers (topology {dict(saved)}), this run "
                f"has {workers} (topology {dict(current)}). Residuals are per worker (a rank, or a node "
                f"under hierarchy='node'): resume with {saved_workers} workers (ranks, or nodes of any "
                f"size), or pass on_world_size_change='reset_residuals' to restart them."
            )
        return codec.reject_topology_change(saved, current, policy)
    # Every entry was checked (codec.check_checkpoint) before this is called.
    worker = rank // per_worker
    entry = dict(block["per_rank_local"][worker * saved_per_worker])
    entry.pop("stats", None)
    log.info(
        "lightning_gmc: resuming %d workers written with topology %s under %s; worker %d keeps its residuals",
        workers,
        dict(saved),
        dict(current),
        worker,
    )
    return entry
