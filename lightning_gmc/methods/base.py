"""Layer 2: per-worker error-feedback and momentum state machines over flat fp32 tensors.

A :class:`Method` turns one worker's gradient for one bucket into messages (compressed payloads), and
the transport's mean of everybody's decoded messages into the update direction the optimizer applies
as ``w <- w - lr * direction``. The same method object runs under the DDP hook (one worker per
process) and the in-process simulator (K workers), because everything it touches is in the
:class:`BucketStep` it is handed.

State lives in a :class:`~lightning_gmc.methods.state.WorkerState` (re-exported here).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_gmc.compressors import CompressionPlan, Compressor, Payload, RandomStreams
from lightning_gmc.methods.state import BucketState, StepSnapshot, WorkerState

__all__ = [
    "BucketState",
    "EvaluationPoint",
    "BucketStep",
    "GroupHyper",
    "Message",
    "Method",
    "ParameterTable",
    "StepSnapshot",
    "SupportAgreement",
    "Undelivered",
    "Term",
    "WorkerState",
]

BufferScope = Literal["local", "shared"]
#: Agrees on a ``leader_support`` compressor's support with the other workers (the transport's, see
#: ``lightning_gmc.transport.support``): ``(compressor, plan, x, buffer, slot) -> int64 indices``,
#: where ``buffer`` is an int32 workspace of ``compressor.support_numel(plan)`` elements the
#: broadcast may use and ``slot`` is the message's index within the step.
SupportAgreement = Callable[[Compressor, CompressionPlan, Tensor, Tensor, int], Tensor]
EvaluationPoint = Literal["params", "mean_params", "params_minus_mean_residual"]


@dataclass(frozen=True)
class ParameterTable:
    """The model's trainable parameters in a fixed global order, shared by every rank.

    A table may also list *pieces* of parameters (``hierarchy="node"`` keeps one rank's shard of the
    model in a table of the pieces it owns, :mod:`~lightning_gmc.methods.shards`); ``keys`` then gives
    each entry the randomness key of its compressor segment.

    Attributes:
        names: fully-qualified parameter names.
        shapes: parameter shapes.
        groups: index of each parameter's optimizer param group.
        keys: the randomness key of each entry (:attr:`~lightning_gmc.compressors.Segment.param_index`);
            empty (the default) means each entry's position, the model's parameter order.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    groups: tuple[int, ...]
    keys: tuple[int, ...] = ()

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    def key(self, index: int) -> int:
        """The randomness key of entry ``index``."""
        return self.keys[index] if self.keys else index

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


@dataclass(frozen=True)
class Undelivered:
    """What the transport's one rounding of a 16-bit sum did not deliver, on the part of the sum this
    worker owns (``docs/algorithms.md`` 3.12).

    A summing route adds the workers' 16-bit values in fp32 and the worker that owns a chunk of the
    sum rounds it to 16 bits once: every worker decodes ``round(S)`` where the workers sent ``S``.
    The owner keeps ``r = S - round(S)``, so a method can put it where its invariant needs it
    (:meth:`Method.absorb_undelivered`): summed over the workers, the remainders are exactly what the
    aggregate misses, ``sum_k C(u_k) - K * mean``.

    Attributes:
        values: ``r`` (fp32) in the layout of the summed tensor, zero outside this worker's chunk.
        decode_add: ``(values, target)``: adds the decoded vector of ``values`` to ``target``, in the
            message's decoded (bucket) space; linear in ``values``.
    """

    values: Tensor
    decode_add: Callable[[Tensor, Tensor], None]

    def add_to(self, target: Tensor, sign: float = 1.0) -> None:
        """``target += sign * r`` (``sign`` +1 or -1), decoded into the bucket's coordinates. A negative
        sign negates ``values`` in place and back (exact; no allocation)."""
        if sign == 1.0:
            self.decode_add(self.values, target)
        elif sign == -1.0:
            self.decode_add(self.values.neg_(), target)
            self.values.neg_()
        else:
            raise ValueError(f"sign must be +1 or -1, got {sign}")
#: A term's coefficient in one param group: a number, or a function of the group's hyper-parameters
#: (e.g. its learning rate).
Coefficient = float | Callable[[GroupHyper], float]


@dataclass(frozen=True)
class Term:
    """``coefficient * tensor``, a summand of an error-feedback vector
    (:meth:`BucketStep.send_error_feedback`); a plain tensor there is a term with coefficient 1.

    Attributes:
        tensor: bucket-sized fp32 tensor, or a function returning it (called only when some group's
            coefficient is not zero).
        coefficient: per param group; zero leaves the term out of that group.
    """

    tensor: Tensor | Callable[[], Tensor]
    coefficient: Coefficient = 1.0


def stage_onto_zero(x: Tensor, active: Sequence[tuple[Tensor, float]]) -> bool:
    """Error feedback's staged sum ``x = residual + sum_i c_i t_i`` (``active``, left to right, sliced
    to one run like ``x``) for a residual known to be zero, without reading or writing it, in the
    cases where that gives the values of adding onto the zeros: no term (``x = 0``); a first
    coefficient of 1 and one more term (``x = t_0 + c_1 t_1``); or that first term alone when ``x`` is
    it (EF stages onto the gradient). Only the sign of a zero may differ (``0 + (-0) = +0``, where the
    shortcut keeps ``-0``). Returns False in every other case: the caller sums onto the residual."""
    if not active:
        x.zero_()
        return True
    (first, c_first), rest = active[0], active[1:]
    if c_first != 1.0 or len(rest) > 1:
        return False
    if not rest:
        return first.data_ptr() == x.data_ptr() and first.shape == x.shape
    last, c_last = rest[0]
    torch.add(first, last, alpha=c_last, out=x)
    return True


def _coefficient(term: Tensor | Term, hyper: GroupHyper) -> float:
    if isinstance(term, Tensor):
        return 1.0
    return term.coefficient(hyper) if callable(term.coefficient) else term.coefficient


def _tensor(term: Tensor | Term) -> Tensor:
    if isinstance(term, Tensor):
        return term
    return term.tensor() if callable(term.tensor) else term.tensor


@dataclass
class Message:
    """One compressed vector on its way to the transport."""

    compressor: Compressor
    plan: CompressionPlan
    payload: Payload
    #: Where the transport writes this message's mean over workers (a state buffer the method keeps
    #: it in anyway, saving a copy); None uses a transport workspace.
    decode_into: Tensor | None = None
    #: Set by the transport when it rounded the sum of this message's slot to 16 bits: what the
    #: rounding did not deliver on the part this worker owns (None: nothing, e.g. fp32 or top-k).
    undelivered: Undelivered | None = None


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
        agree_support: how a ``leader_support`` compressor (``topk_shared``) learns the step's
            support (a collective); None allows such compressors only with one worker.
    """

    bucket: BucketState
    grad: Tensor
    out: Tensor
    hypers: Sequence[GroupHyper]
    step: int
    rng: RandomStreams
    world_size: int
    read_params: Callable[[Tensor], None]
    agree_support: SupportAgreement | None = None
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
        index = self._messages
        slot = self.bucket.message_workspace(index)
        self._messages += 1
        if compressor.leader_support:
            support = self._agreed_support(compressor, plan, x, index)
            payload = compressor.compress_on(x, plan, support, slot)
        else:
            payload = compressor.compress(x, plan, self.rng.salted(stream_offset), self.step, slot)
        return Message(compressor, plan, payload, decode_into)

    def _agreed_support(self, compressor: Compressor, plan: CompressionPlan, x: Tensor, index: int) -> Tensor:
        if self.agree_support is None:
            if self.world_size != 1:
                raise RuntimeError(
                    f"{compressor.name} needs every worker to agree on the support (a broadcast from the "
                    f"step's leader); run it under gmc_hook or the Simulator, which provide agree_support"
                )
            return compressor.propose(x, plan)
        buffer = self.bucket.workspace(f"support{index}", compressor.support_numel(plan), torch.int32)
        return self.agree_support(compressor, plan, x, buffer, index)

    def subtract_own(self, message: Message, x: Tensor) -> None:
        """``x <- x - C(x)`` for a message this worker just produced from ``x``."""
        message.compressor.subtract_own(x, message.payload, message.plan, self.bucket.workspace("decoded"))

    @staticmethod
    def sends_unchanged(compressor: Compressor) -> bool:
        """Whether ``compressor`` sends its input as is (the identity on an fp32 wire,
        :attr:`Compressor.sends_input`): ``C(x) = x``, so error feedback leaves a zero residual."""
        return compressor.sends_input and compressor.shared_support

    def weight_decay(self) -> Term:
        """The coupled-L2 term ``wd * w`` at the gradient's evaluation point, as a summand of
        :meth:`send_error_feedback` (the parameters are read only if some group's ``wd`` is not zero)."""
        return Term(self.params, lambda hyper: hyper.weight_decay)

    def send_error_feedback(
        self,
        compressor: Compressor,
        residual: Tensor,
        *terms: Tensor | Term,
        staging: Tensor,
        decode_into: Tensor | None = None,
    ) -> Message:
        """Error feedback: ``x = residual + terms[0] + terms[1] + ...``; send ``C(x)``; keep ``x - C(x)``
        in ``residual``.

        The terms are added left to right per param group, one pass each, in place in ``residual``
        (a :class:`Term` whose coefficient is zero in a group is left out there), which then is ``x``.
        A compressor that sends its input unchanged (:attr:`Compressor.sends_input`, the identity)
        leaves a zero residual: its ``x`` is built in ``staging`` instead, the last term's pass writing
        ``residual + term`` there (``staging`` may be the buffer that term reads, e.g. GMC's momentum).
        ``staging`` is a buffer the method gives up until the exchange ends: it is sent without a copy
        and the mean over workers is decoded into it. Otherwise the mean goes to ``decode_into`` (see
        :attr:`Message.decode_into`).
        """
        staged = self.sends_unchanged(compressor)
        x = staging if staged else residual
        # the dense route's residual stays zero from step to step: it need not be added nor zeroed
        zero = staged and self.bucket.holds_zeros(residual)
        written = False
        for sl, hyper in self.runs():
            active = [(_tensor(term)[sl], c) for term in terms if (c := _coefficient(term, hyper)) != 0.0]
            if zero and stage_onto_zero(x[sl], active):
                continue
            written = True
            for term, coefficient in active[: -1 if staged else None]:
                residual[sl].add_(term, alpha=coefficient)
            if staged and active:
                term, coefficient = active[-1]
                torch.add(residual[sl], term, alpha=coefficient, out=x[sl])
            elif staged:
                x[sl].copy_(residual[sl])
        if not staged:
            message = self.compress(compressor, x, decode_into=decode_into)
            self.subtract_own(message, residual)
            return message
        if written:  # some run summed onto the residual (every run does unless it held zeros)
            residual.zero_()  # C(x) = x
        self.bucket.note_zeroed(residual)
        return self.send_as_is(compressor, x, decode_into=x)

    def send_as_is(self, compressor: Compressor, x: Tensor, decode_into: Tensor | None = None) -> Message:
        """Send ``x``, which the method gives up until the exchange ends: wrapped without a copy when
        the compressor sends its input unchanged (the identity), else compressed."""
        if not self.sends_unchanged(compressor):
            return self.compress(compressor, x, decode_into=decode_into)
        plan = self.bucket.plan(compressor)
        self._messages += 1  # the slot is not used, but later messages keep their own
        return Message(compressor, plan, compressor.wrap_input(x, plan), decode_into)

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
    #: Shared buffers that must equal the mean over workers of a local buffer, ``{shared: local}``:
    #: EF21's aggregate ``h = mean_k h_k``. :meth:`reset_local` keeps such an invariant when the local
    #: state restarts, and loading a gathered checkpoint that breaks it fails
    #: (:mod:`lightning_gmc.hook.checkpoint_schema`). The other methods keep no invariant between a
    #: local and a shared buffer (``docs/algorithms.md`` 3.14 lists why for each).
    mean_of_local: ClassVar[Mapping[str, str]] = {}

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

    def sends_fp16(self) -> bool:
        """Whether a step can overflow the wire and be refused (a compressor sends fp16 values,
        ``docs/algorithms.md`` 3.12)."""
        return any(compressor.value_dtype == torch.float16 for compressor in self.compressors())

    @abstractmethod
    def encode(self, step: BucketStep) -> list[Message]:
        """Update local state from ``step.grad`` and return the messages to exchange."""

    @abstractmethod
    def decode(self, step: BucketStep, means: Sequence[Tensor]) -> None:
        """Given the mean over workers of each decoded message, write the update direction into
        ``step.out`` (or name the state buffer holding it, :meth:`BucketStep.use_direction`) and update
        state."""

    def absorb_undelivered(self, step: BucketStep, slot: int, undelivered: Undelivered) -> None:
        """Keep what the transport's rounding of the 16-bit sum of message ``slot`` did not deliver
        (:class:`Undelivered`, the part this worker owns), so that the method's invariant holds
        exactly. Called before :meth:`decode`. The default adds it to the ``residual`` buffer of an
        error-feedback method (what the workers sent is delivered or kept, like what the compressor
        dropped) and drops it for a method without one (``dmsgd``: the aggregate is rounded once);
        EF21 subtracts it from the worker's estimate (``h = mean_k h_k``). ``docs/algorithms.md``
        3.12 lists each method's choice."""
        if "residual" in self.buffers:
            undelivered.add_to(step.buffer("residual"))

    def complete(self, step: BucketStep, messages: Sequence[Message], means: Sequence[Tensor]) -> None:
        """Finish the step once the exchange yielded ``means``: every message's undelivered rounding
        to :meth:`absorb_undelivered`, then :meth:`decode`. Reducers call this, not ``decode``."""
        for slot, message in enumerate(messages):
            if message.undelivered is not None:
                self.absorb_undelivered(step, slot, message.undelivered)
        self.decode(step, means)

    def detach_scale(self, hyper: GroupHyper) -> float:
        """Coefficient ``s`` of the detached gradient point ``w - s * residual`` (0: plain ``w``)."""
        return 0.0

    def evaluation_residual_scale(self, hyper: GroupHyper) -> float:
        """Scale of the mean residual subtracted for ``evaluation_point ==
        "params_minus_mean_residual"`` (1 for residuals in parameter units, ``lr`` in gradient units)."""
        return 1.0

    def reset_local(self, worker: WorkerState) -> None:
        """Restart ``worker``'s local buffers, keeping its shared ones (a checkpoint resumed with
        ``on_world_size_change="reset_residuals"``, or on another topology, where per-worker state
        cannot be re-assigned). Local buffers become zero, except one whose mean a shared buffer
        holds (:attr:`mean_of_local`): it takes the shared value, so that the mean over workers is the
        shared buffer exactly, on any number of workers."""
        restarted = set()
        for shared, local in self.mean_of_local.items():
            for target, value in zip(worker.tensors[local], worker.tensors[shared], strict=True):
                target.copy_(value)
            restarted.add(local)
        for name, scope in self.buffers.items():
            if scope == "local" and name not in restarted:
                for tensor in worker.tensors[name]:
                    tensor.zero_()

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the strategy when a training epoch starts (sparsity warm-up schedules)."""
        return None

    def describe(self) -> str:
        return f"{self.name} with {self.compressor.describe()}"
