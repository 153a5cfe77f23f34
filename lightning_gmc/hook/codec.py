"""Checkpoint format of the hook state, shared by the plain-DDP path and :class:`~lightning_gmc.GMCStrategy`.

Two shapes of the same content:

* a **rank state** (:func:`encode_rank_state`): one rank's step, learning-rate history, shared buffers
  (equal on every rank, e.g. global momentum), local buffers (e.g. its residual) and traffic totals;
  what a plain-DDP user saves per rank;
* a **gathered state** (:func:`gather_state`, a collective): the rank state with every rank's local
  buffers (and, for methods whose evaluation model is not the training parameters, every rank's
  training parameters) in ``per_rank_local``, so that one file written by rank 0 resumes every rank.

Loading checks that every restored tensor is finite (one inf in a saved momentum would make every
parameter non-finite from the first step) and applies the world-size policy: residuals are per rank
and cannot be re-assigned to another number of ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gmc.config import WorldSizeChangePolicy
from lightning_gmc.hook.binding import StepClock
from lightning_gmc.methods import Method, WorkerState
from lightning_gmc.transport import CommStats

__all__ = [
    "STATE_FORMAT",
    "check_finite_tensors",
    "encode_rank_state",
    "gather_state",
    "load_rank_state",
    "reject_topology_change",
    "select_rank_local",
    "world_size_of",
]

log = logging.getLogger(__name__)

STATE_FORMAT = 1


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


def check_finite_tensors(what: str, by_buffer: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Raise if a saved tensor holds inf or NaN, naming the buffer and the parameter."""
    for buffer, by_name in by_buffer.items():
        for name, tensor in by_name.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"{what}: {buffer!r} of parameter {name!r} holds non-finite values (inf/NaN); the run "
                    f"that wrote it had diverged. Resume from an earlier checkpoint."
                )


def load_rank_state(
    state: Mapping[str, Any],
    method: Method,
    clock: StepClock,
    worker: WorkerState,
    stats: CommStats,
    load_local: bool = True,
) -> None:
    """Restore :func:`encode_rank_state` output; ``load_local=False`` starts from zero local buffers."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"unsupported lightning_gmc state format {state.get('format')!r}")
    if state["method"] != method.describe():
        raise ValueError(
            f"checkpoint was written by {state['method']!r}, this run uses {method.describe()!r}"
        )
    check_finite_tensors("checkpoint", state["shared"])
    if load_local:
        check_finite_tensors("checkpoint", state["local"])
    clock.load(state["step"], state["last_lrs"])
    worker.load_state_dict(state["shared"])
    if load_local:
        worker.load_state_dict(state["local"])
    else:
        worker.reset("local")
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
    """This rank's entry of a gathered state, or None when the world size changed and the policy
    resets residuals. Checks every rank's entry, so that a bad tensor fails on every rank."""
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
    for saved_rank, local in enumerate(block["per_rank_local"]):
        check_finite_tensors(f"checkpoint (rank {saved_rank})", local["buffers"])
        if "training_parameters" in local:
            check_finite_tensors(
                f"checkpoint (rank {saved_rank})", {"training_parameters": local["training_parameters"]}
            )
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
