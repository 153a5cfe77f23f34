"""The schema of a saved hook state, checked whole before anything is restored.

:func:`check_checkpoint` validates a rank state (:func:`~lightning_gmc.hook.codec.encode_rank_state`)
or a gathered state (:func:`~lightning_gmc.hook.codec.gather_state`) against the run that loads it,
field by field, and raises one :class:`ValueError` naming the first bad field the way it is reached
in the file::

    lightning_gmc checkpoint: per_rank_local[1].buffers['residual']['net.0.weight'] has shape (3, 4),
    the model has (4, 4)

A gathered state is the same file on every rank, and every rank checks every rank's entry (not only
its own), so a bad entry makes all ranks fail alike at load time, without a collective, instead of
one rank failing while the others start training and hang or fail later in a collective. Nothing is
restored before the whole state passed, so a failed load leaves the hook state as it was.

Checked: the format number, the method, ``step`` (an integer >= 0), ``last_lrs`` (None or one finite
learning rate >= 0 per param group), the buffers (exactly the method's, each with exactly the model's
parameters, floating-point tensors of the parameters' shapes, finite), the traffic totals, and for a
gathered state ``world_size``, one ``per_rank_local`` entry per rank (its buffers, totals and, when
present, training parameters), the topology record, and the methods' invariants between shared and
local buffers (:attr:`Method.mean_of_local`, EF21's ``h = mean_k h_k``). Top-level keys it does not
know are ignored (a later format would change ``format``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gmc._arguments import describe_value
from lightning_gmc.methods import Method, ParameterTable

__all__ = ["MEAN_INVARIANT_RTOL", "STATE_FORMAT", "check_auto_state", "check_checkpoint"]

STATE_FORMAT = 1

#: How far a shared buffer may be from the mean of its local buffers (:attr:`Method.mean_of_local`),
#: relative to the largest of their norms, per parameter. The two sides are updated by separate fp32
#: additions (``h += mean_j c_j`` and ``h_k += c_k``) whose rounding errors, 2^-24 relative each,
#: accumulate as a random walk: ~sqrt(T) 2^-24, 6e-5 after 10^6 steps (measured: below 1e-6 after
#: 2,000 steps, 4 workers, every compressor with fp32 values). A dropped or mismatched estimate is of
#: order 1 (0.55 measured for a reset that zeroed the estimates and kept the aggregate).
MEAN_INVARIANT_RTOL = 1e-3

_STATS_TOTALS = ("bytes_sent_total", "dense_bytes_total", "rcc_bits_total", "rcc_dense_bits_total")


def _error(path: str, problem: str) -> ValueError:
    return ValueError(f"lightning_gmc checkpoint: {path} {problem}")


def _mapping(value: object, path: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise _error(path, f"is {describe_value(value)}, expected a dict")
    return value


def _field(block: Mapping[Any, Any], key: str, path: str) -> Any:
    if key not in block:
        raise _error(path, "is missing")
    return block[key]


def _integer(value: object, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _error(path, f"is {describe_value(value)}, expected an integer >= {minimum}")
    if int(value) < minimum:
        raise _error(path, f"is {int(value)}, expected an integer >= {minimum}")
    return int(value)


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _error(path, f"is {describe_value(value)}, expected a finite number >= 0")
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise _error(path, f"is {value!r}, expected a finite number >= 0")
    return float(value)


def _tensors(value: object, path: str, table: ParameterTable) -> None:
    """One finite floating-point tensor per model parameter, of its shape."""
    by_name = _mapping(value, path)
    missing = [name for name in table.names if name not in by_name]
    unexpected = [name for name in by_name if name not in set(table.names)]
    if missing or unexpected:
        raise _error(
            path,
            f"does not match the model: missing parameters {missing[:5]}, unexpected {unexpected[:5]} "
            f"(a checkpoint of another model?)",
        )
    for name, shape in zip(table.names, table.shapes, strict=True):
        where = f"{path}[{name!r}]"
        tensor = by_name[name]
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise _error(where, f"is {describe_value(tensor)}, expected a floating-point tensor")
        if tuple(tensor.shape) != tuple(shape):
            raise _error(where, f"has shape {tuple(tensor.shape)}, the model has {tuple(shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise _error(
                where,
                "holds non-finite values (inf/NaN); the run that wrote it had diverged. Resume from an "
                "earlier checkpoint.",
            )


def _buffers(value: object, path: str, method: Method, scope: str, table: ParameterTable) -> None:
    """Exactly the method's buffers of ``scope``, each a tensor per parameter."""
    by_buffer = _mapping(value, path)
    expected = [name for name, kind in method.buffers.items() if kind == scope]
    for name in by_buffer:
        if name not in expected:
            raise _error(
                f"{path}[{name!r}]",
                f"is a buffer that method {method.name!r} does not keep (its {scope} buffers: {expected})",
            )
    for name in expected:
        _tensors(_field(by_buffer, name, f"{path}[{name!r}]"), f"{path}[{name!r}]", table)


def _stats(value: object, path: str) -> None:
    stats = _mapping(value, path)
    for key in _STATS_TOTALS:
        _number(_field(stats, key, f"{path}[{key!r}]"), f"{path}[{key!r}]")
    if "nonfinite_skips" in stats:
        _number(stats["nonfinite_skips"], f"{path}['nonfinite_skips']")


def _last_lrs(value: object, num_groups: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, list | tuple):
        raise _error("last_lrs", f"is {describe_value(value)}, expected None or a list of learning rates")
    for index, lr in enumerate(value):
        _number(lr, f"last_lrs[{index}]")
    if num_groups is not None and len(value) != num_groups:
        raise _error(
            "last_lrs",
            f"has {len(value)} learning rates, the optimizer has {num_groups} param groups (a checkpoint of "
            f"another optimizer setup?)",
        )


def _topology(value: object, world_size: int) -> None:
    topology = _mapping(value, "topology")
    hierarchy = _field(topology, "hierarchy", "topology['hierarchy']")
    if hierarchy == "flat":
        return
    if hierarchy != "node":
        raise _error("topology['hierarchy']", f"is {describe_value(hierarchy)}, expected 'flat' or 'node'")
    nodes = _integer(_field(topology, "num_nodes", "topology['num_nodes']"), "topology['num_nodes']", 1)
    per_node = _integer(
        _field(topology, "ranks_per_node", "topology['ranks_per_node']"), "topology['ranks_per_node']", 1
    )
    if nodes * per_node != world_size:
        raise _error("topology", f"is {nodes} nodes x {per_node} ranks, but world_size is {world_size}")


def _per_rank_local(value: object, world_size: int, method: Method, table: ParameterTable) -> None:
    if not isinstance(value, list | tuple):
        raise _error("per_rank_local", f"is {describe_value(value)}, expected a list with one entry per rank")
    if len(value) != world_size:
        raise _error("per_rank_local", f"has {len(value)} entries, world_size is {world_size}")
    for rank, entry in enumerate(value):
        path = f"per_rank_local[{rank}]"
        entry = _mapping(entry, path)
        _buffers(_field(entry, "buffers", f"{path}.buffers"), f"{path}.buffers", method, "local", table)
        if "stats" in entry:  # absent in files written before per-rank totals
            _stats(entry["stats"], f"{path}.stats")
        if "training_parameters" in entry:
            _tensors(entry["training_parameters"], f"{path}.training_parameters", table)


def _check_mean_invariants(state: Mapping[str, Any], method: Method) -> None:
    """Each shared buffer of :attr:`Method.mean_of_local` is the mean of the ranks' local buffers."""
    entries: Sequence[Mapping[str, Any]] = state["per_rank_local"]
    for shared, local in method.mean_of_local.items():
        for name, kept in state["shared"][shared].items():
            total = torch.zeros_like(kept, dtype=torch.float64)
            largest = float(torch.linalg.vector_norm(kept.double()))
            for entry in entries:
                part = entry["buffers"][local][name].to(total.device, torch.float64)
                total += part
                largest = max(largest, float(torch.linalg.vector_norm(part)))
            difference = float(torch.linalg.vector_norm(kept.double() - total / len(entries)))
            if difference > MEAN_INVARIANT_RTOL * largest:
                raise _error(
                    f"shared[{shared!r}][{name!r}]",
                    f"is not the mean of per_rank_local[*].buffers[{local!r}][{name!r}] (relative difference "
                    f"{difference / largest:.3g}; fp32 rounding stays below {MEAN_INVARIANT_RTOL:g}): method "
                    f"{method.name!r} keeps {shared} = mean of the ranks' {local}, so the file mixes states "
                    f"of different runs or steps, or comes from a run resumed on another number of ranks "
                    f"by a version that restarted the {local} at zero (its {shared} is biased). Resume from "
                    f"an earlier checkpoint.",
                )


def check_checkpoint(
    state: object, method: Method, table: ParameterTable, num_groups: int | None = None
) -> None:
    """Raise a ValueError naming the first field of ``state`` (a rank state or a gathered state) that
    this run cannot load: ``method`` and its model ``table`` (the attached parameters), with
    ``num_groups`` optimizer param groups when known. Reads the whole state, every rank's entry of a
    gathered one included; restores nothing."""
    block = _mapping(state, "the GMC state")
    fmt = _field(block, "format", "format")
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt != STATE_FORMAT:
        raise _error(
            "format", f"is {describe_value(fmt)}: unsupported state format, this version reads {STATE_FORMAT}"
        )
    written_by = _field(block, "method", "method")
    if written_by != method.describe():
        raise _error(
            "method",
            f"is {written_by!r}: the checkpoint was written by another configuration than this run's "
            f"{method.describe()!r}",
        )
    _integer(_field(block, "step", "step"), "step", 0)
    _last_lrs(_field(block, "last_lrs", "last_lrs"), num_groups)
    _buffers(_field(block, "shared", "shared"), "shared", method, "shared", table)
    _stats(_field(block, "stats", "stats"), "stats")
    if "per_rank_local" not in block:
        _buffers(_field(block, "local", "local"), "local", method, "local", table)
        return
    world_size = _integer(_field(block, "world_size", "world_size"), "world_size", 1)
    _per_rank_local(block["per_rank_local"], world_size, method, table)
    if "topology" in block:  # absent in files written before hierarchy="node"
        _topology(block["topology"], world_size)
    _check_mean_invariants(block, method)


def check_auto_state(state: object, expected_format: int, written_by: object = None) -> dict[str, Any]:
    """The ``density="auto"`` controller's saved state after checking every field (restores nothing).

    Raises:
        ValueError: no state (the checkpoint was written with a fixed density, ``written_by``), or a
            bad field.
    """
    if state is None:
        raise ValueError(
            f"the checkpoint was written with a fixed density ({written_by}); this run has "
            f"density='auto'. Resume with that density, or start density='auto' afresh"
        )
    if not isinstance(state, dict) or state.get("format") != expected_format:
        raise ValueError(f"unsupported density='auto' state in the checkpoint: {state!r:.200}")
    density, pinned, upcoming = state.get("density"), state.get("pinned"), state.get("next_decision")
    if density is not None and not (isinstance(density, float) and 0.0 < density <= 1.0):
        raise ValueError(f"density='auto' state: density is {density!r}, expected None or a float in (0, 1]")
    if pinned not in (None, "none") and not (isinstance(pinned, float) and 0.0 < pinned <= 1.0):
        raise ValueError(f"density='auto' state: pinned is {pinned!r}, expected None, 'none' or a density")
    if isinstance(upcoming, bool) or not isinstance(upcoming, int) or upcoming < 0:
        raise ValueError(f"density='auto' state: next_decision is {upcoming!r}, expected a step")
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise ValueError("density='auto' state: history must be a list of decisions")
    measured = state.get("measured_steps", [])  # absent from checkpoints written before trials
    if not isinstance(measured, list) or not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], float) for pair in measured
    ):
        raise ValueError("density='auto' state: measured_steps must be a list of [density, seconds]")
    return state
