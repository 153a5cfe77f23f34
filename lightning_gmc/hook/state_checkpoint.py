"""The checkpoints of :class:`~lightning_gmc.hook.GMCHookState`, as a base class: save, gather, load.

The state's public checkpoint API and the flow behind it, in the way Lightning's ``LightningModule``
gathers its hook groups from base classes (``CheckpointHooks``); the state sets the parts declared on
:class:`StateCheckpoints`. The format is :mod:`~lightning_gmc.hook.codec`'s, the check of a whole
file :mod:`~lightning_gmc.hook.checkpoint_schema`'s, the mapping of gathered entries onto another
topology :mod:`~lightning_gmc.hook.node_checkpoint`'s. Two rules hold here:

* nothing stale is saved: after a failed collective the step's buffers may be half-summed, so
  :meth:`~StateCheckpoints.state_dict` refuses until a checkpoint has been loaded;
* nothing is restored before the whole file passed its check, every rank's entry included, so a bad
  file fails on every rank alike and leaves the state untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch.distributed as dist

from lightning_gmc.config import WorldSizeChangePolicy
from lightning_gmc.hook import codec
from lightning_gmc.hook.auto_density import AutoDensityController
from lightning_gmc.hook.binding import OptimizerBinding, StepClock
from lightning_gmc.hook.metrics import HookMetrics
from lightning_gmc.hook.node_checkpoint import select_worker_entry
from lightning_gmc.hook.reducer import Reducer
from lightning_gmc.hook.swap import ParameterSwap
from lightning_gmc.methods import Method, ParameterTable, WorkerState
from lightning_gmc.transport import CollectiveFailure, CommStats

__all__ = ["StateCheckpoints", "running_density"]


class StateCheckpoints:
    """The checkpoint API of :class:`~lightning_gmc.hook.GMCHookState` over the parts declared here
    (set by the state), and the record of a failed collective that stops a save."""

    method: Method
    clock: StepClock
    stats: CommStats
    metrics: HookMetrics
    binding: OptimizerBinding
    reducer: Reducer
    swap: ParameterSwap | None
    worker: WorkerState | None
    auto: AutoDensityController | None
    process_group: dist.ProcessGroup | None
    on_world_size_change: WorldSizeChangePolicy
    _failure: CollectiveFailure | None = None

    @property
    def collective_failure(self) -> Exception | None:
        """The failure of a step of this state, if one failed: a collective (that step's buffers may be
        half-summed, e.g. the identity's sum runs in place in GMC's momentum), or under
        ``hierarchy="node"`` an fp16 overflow the shards cannot undo. The state is not saved until a
        checkpoint is loaded."""
        return self._failure or self.reducer.failure

    def note_failure(self, error: CollectiveFailure) -> None:
        """Record a failed collective of the hook body (see :attr:`collective_failure`)."""
        self._failure = error

    def _attached_worker(self, action: str) -> WorkerState:
        if self.worker is None:
            raise RuntimeError(f"attach() must run before {action}")
        return self.worker

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
                f"lightning_gmc: the GMC state cannot be saved: a collective failed during step "
                f"{self.clock.step} and that step's residuals and momentum may be half-summed ({failure}). "
                f"Resume from the last checkpoint written before the failure."
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
        the local buffers (:meth:`Method.reset_local`). Nothing is restored before the whole file
        passed its check.

        A gathered state resumes any topology with the same number of workers K (flat with N ranks,
        or N nodes of any G: each worker keeps its residuals; :mod:`~lightning_gmc.hook.node_checkpoint`);
        another K follows the ``on_world_size_change`` policy."""
        worker = self._attached_worker("load_state_dict()")
        auto_state = self._check_saved(state, worker)
        self._failure = None  # the loaded state is whole
        self.reducer.clear_failure()
        self._restore_saved(state, worker, load_local)
        if self.auto is not None and auto_state is not None:
            self.auto.load_state_dict(auto_state)  # the method runs the saved density from now on

    def _check_saved(self, state: dict[str, Any], worker: WorkerState) -> dict[str, Any] | None:
        """Check the whole file, restoring nothing; returns its checked ``density="auto"`` block."""
        auto_state = None
        if self.auto is not None:  # the saved density decides which configuration the file is of
            auto_state = self.auto.check_state_dict(state.get("auto_density"), state.get("method"))
        # The whole file, every rank's entry too: a bad entry fails on every rank alike, before anything
        # is restored. Gathered states hold the model's parameters; a rank state under
        # hierarchy="node" holds the pieces of the rank's table.
        table = worker.table if _holds_pieces_of(state, worker.table) else self.binding.table
        with running_density(self.method, self.auto, auto_state):
            codec.check_checkpoint(state, self.method, table, len(self.binding.group_momentum))
        return auto_state

    def _restore_saved(self, state: dict[str, Any], worker: WorkerState, load_local: bool) -> None:
        """Restore a checked file: this rank's entry of a gathered state, as the rank's pieces under
        ``hierarchy="node"``."""
        training_parameters = None
        if "per_rank_local" in state:
            world_size = codec.world_size_of(self.process_group)
            rank = dist.get_rank(self.process_group) if world_size > 1 else 0
            policy = self.on_world_size_change
            entry = select_worker_entry(state, self.topology(), rank, world_size, policy)
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


@contextlib.contextmanager
def running_density(
    method: Method, auto: AutoDensityController | None, auto_state: dict[str, Any] | None
) -> Iterator[None]:
    """The method with the compressor of a saved ``density="auto"`` state inside the block (to check
    the file against), the current one again after it."""
    if auto is None or auto_state is None:
        yield
        return
    current = method.compressor
    method.compressor = auto.compressor_for(auto_state["density"])
    try:
        yield
    finally:
        method.compressor = current


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
