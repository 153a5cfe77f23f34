"""The per-rank state of :func:`~lightning_gmc.hook.gmc_hook` (the ``state`` of ``register_comm_hook``).

A slim object that owns its parts and delegates to them. Its detached/evaluation point API comes from
:mod:`~lightning_gmc.hook.points`, its checkpoint API from :mod:`~lightning_gmc.hook.state_checkpoint`.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from lightning_gmc import config as gmc_config
from lightning_gmc._arguments import check_int
from lightning_gmc.config import AutoDensity, GMCConfig, Hierarchy, NonFinitePolicy, WorldSizeChangePolicy
from lightning_gmc.hook.auto_density import AutoDensityController
from lightning_gmc.hook.binding import OptimizerBinding, StepClock
from lightning_gmc.hook.hierarchy import NodeGroups
from lightning_gmc.hook.metrics import HookMetrics
from lightning_gmc.hook.node_reducer import NodeReducer
from lightning_gmc.hook.points import ParameterPoints
from lightning_gmc.hook.reducer import FlatReducer, Reducer
from lightning_gmc.hook.refusal import StepRefusal
from lightning_gmc.hook.state_checkpoint import StateCheckpoints
from lightning_gmc.hook.swap import ParameterSwap
from lightning_gmc.methods import GroupHyper, Method, WorkerState
from lightning_gmc.methods.shards import DEFAULT_MIN_PIECE
from lightning_gmc.transport import CommStats, Exchange, LeaderSupport

__all__ = ["GMCHookState"]

log = logging.getLogger(__name__)


class GMCHookState(ParameterPoints, StateCheckpoints):
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
        log.info("lightning_gmc: %s", binding.summary())

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

    @property
    def method_state_bytes(self) -> int:
        """Bytes of method state (residuals, momentum, ...) this rank holds: the whole model's for
        ``hierarchy="flat"``, the rank's shard of its node's (about 1/G) for ``"node"``."""
        return 0 if self.worker is None else self.worker.nbytes

    def take_metrics(self, device_values: bool = True) -> dict[str, float]:
        """This step's traffic metrics; resets the per-step counters (call it once per optimizer step:
        RCC counts only the steps whose metrics are taken, ``CommStats.defer_rcc``).

        ``device_values``: also the residual norm and the run's skipped non-finite buckets (one pass
        over the residual and one host synchronisation); False leaves both out, for steps whose
        metrics nobody reads.
        """
        metrics = self.metrics.take(self.worker, device_values)
        self.reducer.add_metrics(metrics)
        if self.auto is not None:
            metrics.update(self.auto.metrics())
        return metrics

    def device_metrics(self) -> dict[str, float]:
        """``residual_norm`` (as the residual is now) and ``nonfinite_skips`` (the run's total), which
        :meth:`take_metrics` leaves out with ``device_values=False``; one host synchronisation."""
        return self.metrics.device_values(self.worker)
