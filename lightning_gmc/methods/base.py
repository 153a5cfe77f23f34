"""Layer 2: per-worker error-feedback and momentum state machines over flat fp32 tensors.

A :class:`Method` turns one worker's gradient for one bucket into messages (compressed payloads), and
the transport's mean of everybody's decoded messages into the update direction the optimizer applies
as ``w <- w - lr * direction``. The same method object runs under the DDP hook (one worker per
process) and the in-process simulator (K workers), because everything it touches is in the
:class:`BucketStep` it is handed.

State lives in a :class:`WorkerState`: one fp32 tensor per (buffer name, parameter), keyed by the
parameter's position in the model (never by DDP bucket index). Each bucket layout gets contiguous
storage, and the per-parameter tensors are views into it, so vector maths runs once per bucket while
checkpoints and resumes stay per parameter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_gmc.compressors import CompressionPlan, Compressor, Payload, RandomStreams, Segment, Workspace

__all__ = [
    "BucketState",
    "EvaluationPoint",
    "BucketStep",
    "GroupHyper",
    "Message",
    "Method",
    "ParameterTable",
    "WorkerState",
]

BufferScope = Literal["local", "shared"]
EvaluationPoint = Literal["params", "mean_params", "params_minus_mean_residual"]


@dataclass(frozen=True)
class ParameterTable:
    """The model's trainable parameters in a fixed global order, shared by every rank.

    Attributes:
        names: fully-qualified parameter names.
        shapes: parameter shapes.
        groups: index of each parameter's optimizer param group.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    groups: tuple[int, ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class GroupHyper:
    """Hyper-parameters of one optimizer param group at the current step.

    Attributes:
        lr: learning rate ``eta_t`` of this step.
        prev_lr: learning rate of the previous step (``eta_{t-1}``; equal to ``lr`` at step 0).
        momentum: ``beta``.
        weight_decay: coupled L2 coefficient added to the gradient before compression.
    """

    lr: float
    prev_lr: float
    momentum: float
    weight_decay: float


@dataclass
class Message:
    """One compressed vector on its way to the transport."""

    compressor: Compressor
    plan: CompressionPlan
    payload: Payload
    #: Where the transport writes this message's mean over workers (a state buffer the method keeps
    #: it in anyway, saving a copy); None uses a transport workspace.
    decode_into: Tensor | None = None


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
            segments.append(Segment(offset, numels[index], index))
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
            for seg in state.segments:
                view = storage[seg.offset : seg.offset + seg.numel]
                view.copy_(per_param[seg.param_index])
                per_param[seg.param_index] = view
            state.buffers[name] = storage
        # Layouts sharing a parameter with the new one no longer own its storage.
        claimed = set(param_indices)
        for key in [k for k in self._buckets if claimed.intersection(k)]:
            del self._buckets[key]
        self._buckets[param_indices] = state
        return state

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

    def squared_norm(self, name: str) -> float:
        """Sum of squares of one buffer over all parameters (for the residual-norm metric)."""
        # One read per tensor and no temporaries (a float64 copy of a 25M residual costs more than the
        # whole compression step); per-tensor norms are summed in double precision.
        return sum(float(torch.linalg.vector_norm(t)) ** 2 for t in self.tensors[name])


@dataclass
class BucketStep:
    """Everything a method may touch for one bucket, one worker, one step.

    Attributes:
        bucket: the worker's state for this bucket layout.
        grad: the worker's fp32 gradient for the bucket (may be modified in place).
        out: where :meth:`Method.decode` writes the update direction (fp32, bucket-sized; may alias
            ``grad``), unless it points at a state buffer that already holds it
            (:meth:`use_direction`); readers take :meth:`direction`.
        hypers: current hyper-parameters per optimizer param group.
        step: optimizer step index ``t`` (0-based).
        rng: the worker's random streams.
        world_size: number of workers K.
        read_params: fills a flat fp32 tensor with the worker's current parameter values (the
            gradient-evaluation point).
    """

    bucket: BucketState
    grad: Tensor
    out: Tensor
    hypers: Sequence[GroupHyper]
    step: int
    rng: RandomStreams
    world_size: int
    read_params: Callable[[Tensor], None]
    _params: Tensor | None = field(default=None, repr=False)
    _messages: int = field(default=0, repr=False)
    _direction: Tensor | None = field(default=None, repr=False)

    def buffer(self, name: str) -> Tensor:
        return self.bucket.buffers[name]

    def runs(self) -> Iterator[tuple[slice, GroupHyper]]:
        """(slice, hyper-parameters) for each run of parameters sharing a param group."""
        for sl, group in self.bucket.runs:
            yield sl, self.hypers[group]

    def params(self) -> Tensor:
        """Flat fp32 parameter values of this bucket (read once per step, into a workspace)."""
        if self._params is None:
            self._params = self.bucket.workspace("params")
            self.read_params(self._params)
        return self._params

    def add_weight_decay(self, target: Tensor) -> None:
        """``target += weight_decay * w`` per group (coupled L2 at the gradient's evaluation point, as
        torch.optim.SGD adds it; ``docs/algorithms.md`` 3.4)."""
        for sl, hyper in self.runs():
            if hyper.weight_decay != 0.0:
                target[sl].add_(self.params()[sl], alpha=hyper.weight_decay)

    def compress(
        self, compressor: Compressor, x: Tensor, stream_offset: int = 0, decode_into: Tensor | None = None
    ) -> Message:
        """Compress ``x`` with this bucket's plan. ``stream_offset`` separates a second compressor's
        random draws from the first's within one step; ``decode_into`` receives the mean over workers
        (see :attr:`Message.decode_into`). Each message of the step gets its own payload workspace."""
        plan = self.bucket.plan(compressor)
        slot = self.bucket.message_workspace(self._messages)
        self._messages += 1
        payload = compressor.compress(x, plan, self.rng.salted(stream_offset), self.step, slot)
        return Message(compressor, plan, payload, decode_into)

    def subtract_own(self, message: Message, x: Tensor) -> None:
        """``x <- x - C(x)`` for a message this worker just produced from ``x``."""
        message.compressor.subtract_own(x, message.payload, message.plan, self.bucket.workspace("decoded"))

    def staging(self, compressor: Compressor, residual: Tensor) -> Tensor:
        """Where an error-feedback method should build the vector ``x`` it sends next and keeps
        ``x - C(x)`` of in ``residual``: ``residual`` itself, or, for a compressor that sends its input
        unchanged (the identity), that compressor's payload buffer of the next message, which saves
        copying ``x`` into the payload (:meth:`Compressor.staging_buffer`). Pass the result to
        :meth:`send_residual`."""
        plan = self.bucket.plan(compressor)
        slot = self.bucket.message_workspace(self._messages)
        staged = compressor.staging_buffer(plan, slot, self.bucket.device)
        return residual if staged is None else staged

    def send_residual(
        self,
        compressor: Compressor,
        x: Tensor,
        residual: Tensor,
        stream_offset: int = 0,
        decode_into: Tensor | None = None,
    ) -> Message:
        """Compress ``x`` (built where :meth:`staging` said) and leave ``x - C(x)`` in ``residual``:
        :meth:`compress` then :meth:`subtract_own` when ``x`` is the residual; zero otherwise, since
        a staging buffer means ``C(x) = x``."""
        message = self.compress(compressor, x, stream_offset, decode_into)
        if x is residual:
            self.subtract_own(message, residual)
        else:
            residual.zero_()
        return message

    def use_direction(self, direction: Tensor) -> None:
        """Declare that ``direction`` (a bucket-sized fp32 state buffer the method keeps anyway) holds
        the update direction, instead of copying it into ``out``. It must stay unchanged until the
        next :meth:`Method.encode` of this bucket."""
        self._direction = direction

    def direction(self) -> Tensor:
        """The update direction :meth:`Method.decode` produced: ``out`` or the buffer it named."""
        return self.out if self._direction is None else self._direction


class Method(ABC):
    """Base class of the distributed optimisation methods.

    Class attributes:
        name: registry name.
        buffers: per-parameter fp32 buffers the method keeps and their scope: ``"local"`` (differs per
            rank, e.g. residuals) or ``"shared"`` (identical on every rank, e.g. global momentum).
            Checkpoints save shared buffers once and gather local ones from every rank.
        error_feedback: the method keeps a compression residual (then unbiased compressors are scaled
            by ``1/(1+omega)`` by default).
        requires_shared_support: the method needs all ranks to pick the same coordinates.

    Args:
        compressor: the compressor of the per-step message.
    """

    name: ClassVar[str] = ""
    #: Class default; a method whose buffers depend on its options sets its own in ``__init__``.
    buffers: dict[str, BufferScope] = {}
    error_feedback: ClassVar[bool] = True
    requires_shared_support: ClassVar[bool] = False
    #: Which model validation, testing, prediction and checkpoints use. ``"params"``: the training
    #: parameters (identical on every rank). ``"mean_params"``: the average of the ranks' parameters
    #: (methods with per-rank models, e.g. CSER). ``"params_minus_mean_residual"``: ``w - (1/K) sum_k
    #: s * residual_k`` with ``s = evaluation_residual_scale`` (DEF's virtual iterate). When it is not
    #: ``"params"``, checkpoints also keep every rank's training parameters so training resumes from
    #: them. Methods may override it per instance.
    evaluation_point: EvaluationPoint = "params"
    #: The method applies momentum and weight decay itself: attaching it requires ``torch.optim.SGD``,
    #: whose momentum and weight decay it zeroes (and guards) so the optimizer step is plain SGD. A
    #: method that leaves the optimizer alone (any ``torch.optim`` optimizer) sets this to False.
    takes_over_optimizer: ClassVar[bool] = True
    #: Compressor name the strategy and the simulator build when the user names none (``"none"`` for
    #: the dense reference ``dmsgd``).
    default_compressor: ClassVar[str] = "topk"

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        if self.requires_shared_support and not compressor.shared_support:
            raise ValueError(
                f"method {self.name!r} needs a compressor whose support is shared across ranks "
                f"(e.g. 'rbgs', 'randk', 'none'); {compressor.name!r} is not"
            )

    def compressors(self) -> list[Compressor]:
        """Every compressor this method sends with (for validation and reporting)."""
        return [self.compressor]

    @abstractmethod
    def encode(self, step: BucketStep) -> list[Message]:
        """Update local state from ``step.grad`` and return the messages to exchange."""

    @abstractmethod
    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        """Given the mean over workers of each decoded message, write the update direction into
        ``step.out`` (or name the state buffer holding it, :meth:`BucketStep.use_direction`) and update
        state."""

    def detach_scale(self, hyper: GroupHyper) -> float:
        """Coefficient ``s`` of the detached gradient point ``w - s * residual`` (0: plain ``w``)."""
        return 0.0

    def evaluation_residual_scale(self, hyper: GroupHyper) -> float:
        """Scale of the mean residual subtracted for ``evaluation_point ==
        "params_minus_mean_residual"`` (1 for residuals in parameter units, ``lr`` in gradient units)."""
        return 1.0

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the strategy when a training epoch starts (sparsity warm-up schedules)."""
        return None

    def describe(self) -> str:
        return f"{self.name} with {self.compressor.describe()}"
