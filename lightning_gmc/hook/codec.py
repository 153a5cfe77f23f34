"""Checkpoint format of the hook state, shared by the plain-DDP path and :class:`~lightning_gmc.GMCStrategy`.

Two shapes of the same content:

* a **rank state** (:func:`encode_rank_state`): one rank's step, learning-rate history, shared buffers
  (equal on every rank, e.g. global momentum), local buffers (e.g. its residual) and traffic totals;
  what a plain-DDP user saves per rank;
* a **gathered state** (:func:`gather_state`, a collective): the rank state with every rank's local
  buffers (and, for methods whose evaluation model is not the training parameters, every rank's
  training parameters) in ``per_rank_local``, so that one file written by rank 0 resumes every rank.

Loading first checks the whole state (:func:`check_checkpoint`, in
:mod:`~lightning_gmc.hook.checkpoint_schema`: every field, every rank's entry, every tensor finite,
the methods' invariants), then applies the world-size policy: residuals are per rank and cannot be
re-assigned to another number of ranks, so a resume with another number of ranks or another topology
restarts them (:meth:`Method.reset_local`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor

from lightning_gmc.config import WorldSizeChangePolicy
from lightning_gmc.hook.binding import StepClock
from lightning_gmc.hook.checkpoint_schema import STATE_FORMAT, check_checkpoint
from lightning_gmc.methods import Method, WorkerState
from lightning_gmc.transport import CommStats

__all__ = [
    "STATE_FORMAT",
    "check_checkpoint",
    "encode_rank_state",
    "gather_state",
    "load_rank_state",
    "reject_topology_change",
    "select_rank_local",
    "world_size_of",
]

log = logging.getLogger(__name__)


def world_size_of(process_group: dist.ProcessGroup | None) -> int:
    """Ranks in ``process_group`` (1 without an initialised process group)."""
    return dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1


def encode_rank_state(
    method: Method, clock: StepClock, worker: WorkerState, stats: CommStats
) -> dict[str, Any]:
    """This rank's state (CPU copies)."""
    return {
        "format": STATE_FORMAT,
        "method": method.describe(),
        "step": clock.step,
        "last_lrs": clock.last_lrs,
        "shared": worker.state_dict("shared"),
        "local": worker.state_dict("local"),
        "stats": stats.state_dict(),
    }


def load_rank_state(
    state: Mapping[str, Any],
    method: Method,
    clock: StepClock,
    worker: WorkerState,
    stats: CommStats,
    load_local: bool = True,
) -> None:
    """Restore :func:`encode_rank_state` output, checked by
    :func:`~lightning_gmc.hook.checkpoint_schema.check_checkpoint`; ``load_local=False`` restarts the
    local buffers (:meth:`Method.reset_local`: zero residuals; EF21's estimates take the kept
    aggregate)."""
    clock.load(state["step"], state["last_lrs"])
    worker.load_state_dict(state["shared"])
    if load_local:
        worker.load_state_dict(state["local"])
    else:
        method.reset_local(worker)  # zero, except what an invariant ties to the shared buffers
    stats.load_state_dict(state["stats"])


def gather_state(
    rank_state: dict[str, Any],
    training_parameters: dict[str, Tensor] | None,
    process_group: dist.ProcessGroup | None,
) -> dict[str, Any]:
    """Every rank's local state in one block (a collective: call on every rank)."""
    state = dict(rank_state)
    # Traffic totals too: under hierarchy="node" the local ranks of a node carry different shares.
    local: dict[str, Any] = {"buffers": state.pop("local"), "stats": state["stats"]}
    if training_parameters is not None:
        local["training_parameters"] = training_parameters
    world_size = world_size_of(process_group)
    gathered: list[Any] = [local]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local, group=process_group)
    state["world_size"] = world_size
    state["per_rank_local"] = gathered
    return state


def select_rank_local(
    block: Mapping[str, Any], rank: int, world_size: int, policy: WorldSizeChangePolicy
) -> dict[str, Any] | None:
    """This rank's entry of a gathered state (checked whole by
    :func:`~lightning_gmc.hook.checkpoint_schema.check_checkpoint`), or None when the world size
    changed and the policy resets residuals."""
    saved_world = int(block["world_size"])
    if saved_world != world_size:
        if policy == "error":
            raise RuntimeError(
                f"the checkpoint was written by {saved_world} ranks, this run has {world_size}. "
                f"Residuals are per rank and cannot be re-assigned; pass "
                f"on_world_size_change='reset_residuals' to resume with zero residuals."
            )
        log.warning(
            "lightning_gmc: world size changed from %d to %d; residuals reset to zero",
            saved_world,
            world_size,
        )
        return None
    entry: dict[str, Any] = block["per_rank_local"][rank]
    return entry


def reject_topology_change(
    saved: Mapping[str, Any], current: Mapping[str, Any], policy: WorldSizeChangePolicy
) -> dict[str, Any] | None:
    """Apply the world-size policy to a checkpoint whose workers map onto ranks differently (e.g.
    written flat, resumed with ``hierarchy="node"``): raise, or return None (residuals reset)."""
    if policy == "error":
        raise RuntimeError(
            f"the checkpoint was written with topology {dict(saved)}, this run has {dict(current)}. "
            f"Residuals are per worker (rank, or node under hierarchy='node') and cannot be re-assigned; "
            f"pass on_world_size_change='reset_residuals' to resume with zero residuals."
        )
    log.warning("lightning_gmc: topology changed from %s to %s; residuals reset to zero", saved, current)
    return None
