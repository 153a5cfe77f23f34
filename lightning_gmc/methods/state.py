"""One worker's method state: per-parameter fp32 buffers with contiguous per-bucket storage.

State lives in a :class:`WorkerState`: one fp32 tensor per (buffer name, parameter), keyed by the
parameter's position in the model (never by DDP bucket index). Each bucket layout gets contiguous
storage (:class:`BucketState`), and the per-parameter tensors are views into it, so vector maths runs
once per bucket while checkpoints and resumes stay per parameter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_gmc.compressors import CompressionPlan, Compressor, RandomStreams, Segment, Workspace

if TYPE_CHECKING:
    from lightning_gmc.methods.base import BufferScope, Method, ParameterTable

__all__ = ["BucketState", "StepSnapshot", "WorkerState"]


class BucketState:
    """One worker's state for one bucket layout: contiguous buffers, plans and workspaces.

    Plans are cached by compressor *value* (compressors are frozen dataclasses), so equal
    configurations share one plan and a ``dataclasses.replace``'d compressor gets its own. Payload
    buffers are owned by message slots (:meth:`message_workspace`), never by plans, so two messages in
    flight together never share a buffer even when their compressors are equal.
    """

    def __init__(self, worker: WorkerState, param_indices: tuple[int, ...]) -> None:
        self.param_indices = param_indices
        numels = worker.table.numels
        segments = []
        offset = 0
        for index in param_indices:
            segments.append(Segment(offset, numels[index], worker.table.key(index)))
            offset += numels[index]
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.numel = offset
        self.device = worker.device
        groups = [worker.table.groups[i] for i in param_indices]
        # Runs of consecutive parameters that share a param group: per-group scalars are applied
        # per run, and a model with one group has a single run per bucket.
        self.runs: list[tuple[slice, int]] = []
        for seg, group in zip(self.segments, groups, strict=True):
            if self.runs and self.runs[-1][1] == group:
                self.runs[-1] = (slice(self.runs[-1][0].start, seg.offset + seg.numel), group)
            else:
                self.runs.append((slice(seg.offset, seg.offset + seg.numel), group))
        self.buffers: dict[str, Tensor] = {}
        # Keyed by compressor value; the layout part of the (compressor, layout) key is this bucket's.
        self._plans: dict[Compressor, CompressionPlan] = {}
        self._scratch = Workspace()
        self._message_slots: list[Workspace] = []
        # id -> (buffer, its version counter) when a method last left it all zeros
        self._zeroed: dict[int, tuple[Tensor, int]] = {}

    def note_zeroed(self, buffer: Tensor) -> None:
        """Remember that ``buffer`` (a state buffer of this bucket) holds zeros now."""
        self._zeroed[id(buffer)] = (buffer, buffer._version)

    def holds_zeros(self, buffer: Tensor) -> bool:
        """Whether ``buffer`` still holds the zeros of :meth:`note_zeroed`: torch's version counter,
        which every in-place write to it or to a view of its storage advances (a checkpoint's load,
        an undelivered remainder, a refused step's restore), has not moved since. Collectives do not
        advance it: no collective writes into a method's local buffers."""
        entry = self._zeroed.get(id(buffer))
        return entry is not None and entry[0] is buffer and buffer._version == entry[1]

    def plan(self, compressor: Compressor) -> CompressionPlan:
        """The compressor's plan for this layout, computed on first use of an equal compressor.

        Raises:
            TypeError: the compressor is not hashable (compressors must be frozen dataclasses).
        """
        try:
            plan = self._plans.get(compressor)
        except TypeError as err:
            raise TypeError(
                f"{type(compressor).__name__} is not hashable: compressors are values, declare them with "
                f"@dataclass(frozen=True)"
            ) from err
        if plan is None:
            plan = compressor.plan(self.segments)
            self._plans[compressor] = plan
        return plan

    def workspace(self, name: str, numel: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """A scratch tensor owned by this bucket (``numel`` defaults to the bucket's), allocated once
        and reused every step."""
        return self._scratch.tensor(name, self.numel if numel is None else numel, dtype, self.device)

    def message_workspace(self, slot: int) -> Workspace:
        """The owner of the payload buffers of the ``slot``-th message of a step (0-based): it lives as
        long as the bucket, so payloads reuse their buffers from step to step."""
        while len(self._message_slots) <= slot:
            self._message_slots.append(Workspace())
        return self._message_slots[slot]


class WorkerState:
    """All method state of one worker (rank), keyed by parameter.

    Args:
        method: the method whose buffers this state holds.
        table: the model's parameters.
        device: where the state lives.
        rank: this worker's rank (selects private random streams).
        seed: run seed, equal on every rank.
    """

    def __init__(
        self, method: Method, table: ParameterTable, device: torch.device, rank: int, seed: int
    ) -> None:
        self.method = method
        self.table = table
        self.device = torch.device(device)
        self.rank = rank
        self.rng = RandomStreams(seed, rank)
        # per buffer name: one fp32 tensor per parameter (flat). Views into bucket storage once a
        # bucket layout has claimed the parameter.
        self.tensors: dict[str, list[Tensor]] = {
            name: [torch.zeros(n, dtype=torch.float32, device=self.device) for n in table.numels]
            for name in method.buffers
        }
        self._buckets: dict[tuple[int, ...], BucketState] = {}

    def bucket(self, param_indices: tuple[int, ...]) -> BucketState:
        """State for a bucket holding these parameters (in this order).

        A new layout (DDP's first iteration uses one bucket, later ones the rebuilt layout) gets fresh
        contiguous storage; the parameters' current values move into it, so nothing is lost.
        """
        state = self._buckets.get(param_indices)
        if state is not None:
            return state
        state = BucketState(self, param_indices)
        for name, per_param in self.tensors.items():
            storage = torch.empty(state.numel, dtype=torch.float32, device=self.device)
            for index, seg in zip(param_indices, state.segments, strict=True):
                view = storage[seg.offset : seg.offset + seg.numel]
                view.copy_(per_param[index])
                per_param[index] = view
            state.buffers[name] = storage
        # Layouts sharing a parameter with the new one no longer own its storage.
        claimed = set(param_indices)
        for key in [k for k in self._buckets if claimed.intersection(k)]:
            del self._buckets[key]
        self._buckets[param_indices] = state
        return state

    @property
    def layouts(self) -> tuple[tuple[int, ...], ...]:
        """The parameter indices of every bucket layout that currently owns state (DDP's buckets)."""
        return tuple(self._buckets)

    def state_dict(self, scope: BufferScope | None = None) -> dict[str, dict[str, Tensor]]:
        """Buffers by name and parameter FQN (cloned to CPU). ``scope`` filters local/shared buffers."""
        out: dict[str, dict[str, Tensor]] = {}
        for name, per_param in self.tensors.items():
            if scope is not None and self.method.buffers[name] != scope:
                continue
            out[name] = {
                fqn: t.detach().reshape(shape).cpu().clone()
                for fqn, t, shape in zip(self.table.names, per_param, self.table.shapes, strict=True)
            }
        return out

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Copy buffers saved by :meth:`state_dict` into this state (shapes and names must match)."""
        for name, by_fqn in state.items():
            if name not in self.tensors:
                raise KeyError(
                    f"checkpoint has buffer {name!r} that method {self.method.name!r} does not keep"
                )
            per_param = self.tensors[name]
            missing = set(self.table.names) - set(by_fqn)
            unexpected = set(by_fqn) - set(self.table.names)
            if missing or unexpected:
                raise ValueError(
                    f"checkpointed {name!r} does not match the model: missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}"
                )
            for index, (fqn, shape) in enumerate(zip(self.table.names, self.table.shapes, strict=True)):
                saved = by_fqn[fqn]
                if tuple(saved.shape) != tuple(shape):
                    raise ValueError(
                        f"checkpointed {name!r} for {fqn} has shape {tuple(saved.shape)}, "
                        f"the model has {tuple(shape)}"
                    )
                per_param[index].copy_(saved.reshape(-1))

    def reset(self, scope: BufferScope | None = None) -> None:
        """Zero buffers (all, or only local / shared ones)."""
        for name, per_param in self.tensors.items():
            if scope is None or self.method.buffers[name] == scope:
                for t in per_param:
                    t.zero_()

    @property
    def nbytes(self) -> int:
        """Bytes of method state this worker holds (every buffer, fp32)."""
        return 4 * len(self.tensors) * self.table.numel



class StepSnapshot:
    """The method buffers of every bucket one step touched, as they were before it, so that a step can
    be refused without a trace (``wire_dtype="fp16"``, ``docs/algorithms.md`` 3.12).

    :meth:`keep` copies a bucket's buffers before its first encode of the step into workspaces of the
    bucket (allocated once: one more copy of the method state, and one pass over it per step);
    :meth:`restore` copies them back for every bucket of the step.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self._buckets: list[BucketState] = []

    def keep(self, step: int, bucket: BucketState) -> None:
        """Copy ``bucket``'s buffers, once per step, before the step changes them."""
        if step != self.step:
            self.step = step
            self._buckets = []
        if any(kept is bucket for kept in self._buckets):
            return
        for name, buffer in bucket.buffers.items():
            bucket.workspace(f"snapshot_{name}").copy_(buffer)
        self._buckets.append(bucket)

    def restore(self) -> None:
        """Put back every kept bucket's buffers (the state before the step) and forget them."""
        for bucket in self._buckets:
            for name, buffer in bucket.buffers.items():
                buffer.copy_(bucket.workspace(f"snapshot_{name}"))
        self._buckets = []
        self.step = None
