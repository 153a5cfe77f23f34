"""The per-rank state of :func:`~lightning_gmc.hook.gmc_hook` (the ``state`` of ``register_comm_hook``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_gmc import config as gmc_config
from lightning_gmc._arguments import check_int
from lightning_gmc.config import AutoDensity, GMCConfig, Hierarchy, NonFinitePolicy, WorldSizeChangePolicy
from lightning_gmc.hook import codec
from lightning_gmc.hook.auto_density import AutoDensityController
from lightning_gmc.hook.binding import OptimizerBinding, StepClock
from lightning_gmc.hook.hierarchy import NodeGroups
from lightning_gmc.hook.metrics import HookMetrics
from lightning_gmc.hook.node_checkpoint import select_worker_entry
from lightning_gmc.hook.node_reducer import NodeReducer
from lightning_gmc.hook.reducer import FlatReducer, Reducer
from lightning_gmc.hook.refusal import StepRefusal
from lightning_gmc.hook.swap import ParameterSwap
from lightning_gmc.methods import GroupHyper, Method, ParameterTable, WorkerState
from lightning_gmc.methods.shards import DEFAULT_MIN_PIECE
from lightning_gmc.transport import CollectiveFailure, CommStats, Exchange, LeaderSupport

__all__ = ["GMCHookState"]

log = logging.getLogger(__name__)


class GMCHookState:
    """Per-rank state of :func:`gmc_hook`, in the spirit of torch's ``PowerSGDState``. Parts:
    :attr:`binding` (parameters, optimizer takeover), :attr:`clock` (step, LR history), :attr:`worker`
    (method buffers), :attr:`swap` (detached/evaluation points, averaging through :attr:`exchange`'s
    collectives), :attr:`reducer` (one bucket in, its update direction out: the method, its exchange
    and, under ``hierarchy="node"``, the node's process groups; :mod:`~lightning_gmc.hook.reducer`).

    Args:
        method: the method (holds its compressor), e.g. ``GMCConfig(compressor="rbgs").build()``.
        process_group: the group DDP reduces in; None means the default group.
        seed: seed of the shared random streams (RBGS blocks, random-k); must be equal on every rank.
        momentum: overrides every param group's ``momentum`` when not None.
        nonfinite: what to do when a rank's gradient for a bucket contains inf/NaN.
            ``"skip"`` (default): that rank sends a zero gradient for the bucket this step (its
            residual and the shared momentum stay clean; counted in ``nonfinite_skips``, no extra
            sync). ``"raise"``: raise :class:`FloatingPointError` (a device sync per bucket); the
            other ranks' collectives then fail once that process ends, so they stop too.
        on_world_size_change: loading a gathered state written by another number of ranks:
            ``"error"`` (default) or ``"reset_residuals"`` (keep the step, learning-rate history and
            shared buffers; start every rank's residual from zero).
        hierarchy: ``"flat"`` (every rank is a worker) or ``"node"`` (one worker per node; give the
            groups with :meth:`set_node_groups` before :meth:`attach`; ``docs/algorithms.md`` 3.11).
        auto_density: the options of ``density="auto"``: the hook then chooses the density between
            steps (:attr:`auto`, :mod:`~lightning_gmc.hook.auto_density`); flat only.
    """

    def __init__(
        self,
        method: Method,
        process_group: dist.ProcessGroup | None = None,
        seed: int = 0,
        momentum: float | None = None,
        nonfinite: NonFinitePolicy = "skip",
        on_world_size_change: WorldSizeChangePolicy = "error",
        hierarchy: Hierarchy = "flat",
        auto_density: AutoDensity | None = None,
    ) -> None:
        self.hierarchy = gmc_config.check_hierarchy(hierarchy)
        if auto_density is not None and self.hierarchy != "flat":
            raise ValueError(
                "density='auto' runs with hierarchy='flat' for now; give hierarchy='node' a density"
            )
        #: the controller of ``density="auto"`` (None for a fixed density)
        self.auto = AutoDensityController(auto_density) if auto_density is not None else None
        self.nonfinite = gmc_config.check_nonfinite_policy(nonfinite)
        self.on_world_size_change = gmc_config.check_world_size_policy(on_world_size_change)
        self.method = method
        self.process_group = process_group
        self.seed = check_int("seed", seed)
        self.binding = OptimizerBinding(method, momentum)
        self.clock = StepClock(self.binding)
        self.stats = CommStats(defer_rcc=True)  # RCC only for steps whose metrics are taken
        self.reducer: Reducer = FlatReducer(self.stats, process_group)
        self.hook_calls = 0
        self.worker: WorkerState | None = None
        self.swap: ParameterSwap | None = None
        self.metrics = HookMetrics(self.stats)
        self.refusal = StepRefusal(False, self.clock, self.stats, self.metrics, self._restore_buffers)
        self._failure: CollectiveFailure | None = None

    def _restore_buffers(self) -> None:
        self.reducer.restore_step()

    @classmethod
    def from_config(cls, config: GMCConfig, process_group: dist.ProcessGroup | None = None) -> GMCHookState:
        """The state for a validated :class:`~lightning_gmc.config.GMCConfig` (builds its method)."""
        return cls(
            config.build(),
            process_group=process_group,
            seed=config.seed,
            momentum=config.momentum,
            nonfinite=config.nonfinite,
            on_world_size_change=config.on_world_size_change,
            hierarchy=config.hierarchy,
            auto_density=config.auto,
        )

    def set_node_groups(self, groups: NodeGroups, min_piece: int = DEFAULT_MIN_PIECE) -> None:
        """Run hierarchically over these groups (from :func:`~lightning_gmc.hook.build_node_groups`):
        one worker per node, each local rank running the method on its shard of every bucket, over
        ``groups.inter``. ``min_piece``: parameters of at least ``G * min_piece`` elements are split
        across the node's G ranks, smaller ones stay whole (:mod:`~lightning_gmc.methods.shards`)."""
        if self.hierarchy != "node":
            raise ValueError("set_node_groups() is for hierarchy='node'; this state was built flat")
        if self.process_group is not None:
            raise ValueError("hierarchy='node' builds its groups from the default process group; pass none")
        if self.worker is not None:
            raise RuntimeError("set_node_groups() must run before attach()")
        self.reducer = NodeReducer(self.stats, groups, min_piece)

    @property
    def node_groups(self) -> NodeGroups | None:
        """The node groups of ``hierarchy="node"`` (None until :meth:`set_node_groups`, and flat)."""
        return self.reducer.groups if isinstance(self.reducer, NodeReducer) else None

    @property
    def exchange(self) -> Exchange:
        """The method's gradient exchange (the reducer's)."""
        return self.reducer.exchange

    @property
    def support(self) -> LeaderSupport:
        """The selection stage of ``topk_shared`` (a broadcast of the leader's indices)."""
        return self.reducer.support

    @property
    def step(self) -> int:
        """Optimizer steps completed (the public step clock; see :attr:`clock`)."""
        return self.clock.step

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Bind to the model's trainable parameters and, for methods that do (all but ``ef``), take over
        the optimizer's momentum and weight decay (see
        :class:`~lightning_gmc.hook.binding.OptimizerBinding` for what is raised)."""
        binding = self.binding
        if self.hierarchy == "node" and self.node_groups is None:
            raise RuntimeError(
                "hierarchy='node' needs its process groups before attach(): call state.set_node_groups("
                "lightning_gmc.hook.build_node_groups(ranks_per_node)) on every rank"
            )
        binding.attach(model, optimizer)
        device = binding.params[0].device if binding.params else torch.device("cpu")
        self.worker = self.reducer.attach(self.method, binding.table, device, self.seed)
        self.refusal.enabled = self.method.sends_fp16()
        if self.auto is not None:
            self.auto.attach(self.method, self.clock, self.worker, optimizer, self.process_group)
        distributed = dist.is_available() and dist.is_initialized()
        collectives = self.exchange.collectives if distributed else None
        # The reducer gives the full residual (under hierarchy="node" gathered from the node's shards).
        residuals = self.reducer.residuals if "residual" in self.worker.tensors else None
        self.swap = ParameterSwap(self.method, binding.params, binding.table, residuals, collectives)
        if binding.takes_over:
            log.info(
                "lightning_gmc: %s on %d parameters (%d elements); momentum=%s weight_decay=%s",
                *(self.method.describe(), len(binding.table), binding.table.numel),
                *(binding.group_momentum, binding.group_weight_decay),
            )
        else:
            log.info(
                "lightning_gmc: %s on %d parameters (%d elements); %s applies its own momentum and "
                "weight decay",
                *(self.method.describe(), len(binding.table), binding.table.numel),
                type(optimizer).__name__,
            )

    def release_optimizer_hyperparameters(self) -> None:
        """Zero the optimizer's momentum and weight decay again (the method applies them)."""
        self.binding.release_optimizer_hyperparameters()

    def current_hypers(self) -> list[GroupHyper]:
        """Hyper-parameters of the step about to run (learning rates read from the optimizer now)."""
        return self.clock.peek()

    def begin_step(self) -> list[GroupHyper]:
        """Hyper-parameters of the current step, fixed at its first bucket (see :class:`StepClock`)."""
        return self.clock.begin_step()

    def end_step(self) -> None:
        """Advance the step clock (the hook calls it at the step's last bucket), unless the step was
        refused (:mod:`~lightning_gmc.hook.refusal`)."""
        if not self.refusal.end_step():
            self.clock.end_step()

    @contextlib.contextmanager
    def detached_point(self) -> Iterator[None]:
        """Evaluate the gradient at the method's detached point (GMC+, DEF-A) inside this block: the
        parameters move to ``w - s * residual`` on entry and back bit-exactly on exit. Wrap the forward
        *and* backward of every micro-batch of a step."""
        self.enter_detached_point()
        try:
            yield
        finally:
            self.exit_detached_point()

    def enter_detached_point(self) -> None:
        if self.swap is not None:
            self.swap.enter_detached(self.current_hypers())

    def exit_detached_point(self) -> None:
        if self.swap is not None:
            self.swap.restore("detached")

    @property
    def evaluation_differs(self) -> bool:
        """True when the method evaluates a model other than the training parameters."""
        return self.swap is not None and self.swap.evaluation_differs

    @contextlib.contextmanager
    def evaluation_point(self) -> Iterator[None]:
        """The method's evaluation model inside this block (a collective: enter on every rank)."""
        if self.swap is None:
            yield
            return
        with self.swap.evaluation(self.current_hypers()):
            yield

    def enter_evaluation_point(self) -> None:
        if self.swap is not None:
            self.swap.enter_evaluation(self.current_hypers())

    def exit_evaluation_point(self) -> None:
        if self.swap is not None:
            self.swap.restore("evaluation")

    def _attached_worker(self, action: str) -> WorkerState:
        if self.worker is None:
            raise RuntimeError(f"attach() must run before {action}")
        return self.worker

    @property
    def collective_failure(self) -> CollectiveFailure | None:
        """The collective that failed in a step of this state, if one did: that step's buffers may be
        half-summed (e.g. the identity's sum runs in place in GMC's momentum), so the state is not
        saved until a checkpoint is loaded."""
        return self._failure or self.exchange.failed

    def note_failure(self, error: CollectiveFailure) -> None:
        """Record a failed collective of the hook body (see :attr:`collective_failure`)."""
        self._failure = error

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: step, learning-rate history, shared and local buffers, traffic totals.

        Raises:
            RuntimeError: a collective failed in a step of this state (:attr:`collective_failure`):
                nothing of it may reach a checkpoint.
        """
        worker = self._attached_worker("state_dict()")
        failure = self.collective_failure
        if failure is not None:
            raise RuntimeError(
                f"lightning_gmc: the GMC state cannot be saved: a collective failed during step {self.step} "
                f"and that step's residuals and momentum may be half-summed ({failure}). Resume from the "
                f"last checkpoint written before the failure."
            )
        self.metrics.flush_nonfinite()
        state = codec.encode_rank_state(self.method, self.clock, worker, self.stats)
        if self.auto is not None:
            state["auto_density"] = self.auto.state_dict()
        return state

    def gathered_state_dict(self) -> dict[str, Any]:
        """Every rank's state in one dict, for one checkpoint file (a collective: call on every rank).
        Carries each rank's training parameters when :attr:`evaluation_differs`."""
        swap = self.swap  # during validation the parameters are the evaluation model: use the backup
        values = swap.training_values() if swap and swap.evaluation_differs else None
        params = None if values is None else self.binding.training_parameters(values)
        state = self.reducer.gather_state(self.state_dict(), params)
        state["topology"] = self.topology()
        return state

    def topology(self) -> dict[str, Any]:
        """How the workers map onto ranks (recorded in gathered checkpoints)."""
        return self.reducer.topology()

    def load_state_dict(self, state: dict[str, Any], load_local: bool = True) -> None:
        """Restore :meth:`state_dict` or :meth:`gathered_state_dict` output; ``load_local=False`` restarts
        the local buffers (:meth:`Method.reset_local`).

        A gathered state resumes any topology with the same number of workers K (flat with N ranks,
        or N nodes of any G: each worker keeps its residuals; :mod:`~lightning_gmc.hook.node_checkpoint`);
        another K follows the ``on_world_size_change`` policy."""
        worker = self._attached_worker("load_state_dict()")
        auto_state = None
        if self.auto is not None:  # the saved density decides which configuration the file is of
            auto_state = self.auto.check_state_dict(state.get("auto_density"), state.get("method"))
        # The whole file, every rank's entry too: a bad entry fails on every rank alike, before anything
        # is restored. Gathered states hold the model's parameters; a rank state under
        # hierarchy="node" holds the pieces of the rank's table.
        table = self.binding.table
        if _holds_pieces_of(state, worker.table):
            table = worker.table
        with self._running_density(auto_state):
            codec.check_checkpoint(state, self.method, table, len(self.binding.group_momentum))
        self._failure = self.exchange.failed = None  # the loaded state is whole
        training_parameters = None
        if "per_rank_local" in state:
            world_size = codec.world_size_of(self.process_group)
            rank = dist.get_rank(self.process_group) if world_size > 1 else 0
            entry = select_worker_entry(state, self.topology(), rank, world_size, self.on_world_size_change)
            load_local = load_local and entry is not None
            training_parameters = entry.get("training_parameters") if entry is not None else None
            state = {**state, "local": entry["buffers"] if entry is not None else {}}
            if entry is not None and "stats" in entry:
                state["stats"] = entry["stats"]
        # Full per-parameter tensors become this rank's pieces under hierarchy="node".
        local = self.reducer.to_local(state["local"]) if load_local else state["local"]
        state = {**state, "shared": self.reducer.to_local(state["shared"]), "local": local}
        codec.load_rank_state(state, self.method, self.clock, worker, self.stats, load_local)
        self.reducer.state_changed()
        if load_local and training_parameters is not None:
            self.binding.load_training_parameters(training_parameters)
        if self.auto is not None and auto_state is not None:
            self.auto.load_state_dict(auto_state)  # the method runs the saved density from now on

    @contextlib.contextmanager
    def _running_density(self, auto_state: dict[str, Any] | None) -> Iterator[None]:
        """The method with the compressor of a saved ``density="auto"`` state inside the block (to check
        the file against), the current one again after it."""
        if self.auto is None or auto_state is None:
            yield
            return
        current = self.method.compressor
        self.method.compressor = self.auto.compressor_for(auto_state["density"])
        try:
            yield
        finally:
            self.method.compressor = current

    @property
    def method_state_bytes(self) -> int:
        """Bytes of method state (residuals, momentum, ...) this rank holds: the whole model's for
        ``hierarchy="flat"``, the rank's shard of its node's (about 1/G) for ``"node"``."""
        return 0 if self.worker is None else self.worker.nbytes

    def take_metrics(self) -> dict[str, float]:
        """This step's traffic metrics plus the residual norm; resets the per-step counters. RCC
        counts only the steps whose metrics are taken (``CommStats.defer_rcc``)."""
        metrics = self.metrics.take(self.worker)
        self.reducer.add_metrics(metrics)
        if self.auto is not None:
            metrics.update(self.auto.metrics())
        return metrics


def _holds_pieces_of(state: object, table: ParameterTable) -> bool:
    """Whether ``state`` is a rank state whose buffers are keyed by this table's names (a rank's
    pieces); anything else is checked against the model's table."""
    if not isinstance(state, Mapping) or "per_rank_local" in state:
        return False
    scopes = [state.get(scope) for scope in ("shared", "local")]
    buffers = [by_name for scope in scopes if isinstance(scope, Mapping) for by_name in scope.values()]
    if not all(isinstance(scope, Mapping) for scope in scopes):
        return False
    names = set(table.names)
    return bool(buffers) and all(isinstance(b, Mapping) and set(b) == names for b in buffers)
