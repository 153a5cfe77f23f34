"""Layer 5 (Fabric): GMC in a Lightning Fabric training loop, registered as ``Fabric(strategy="gmc")``.

::

    fabric = L.Fabric(strategy="gmc", accelerator="cpu", devices=2)  # or GMCFabricStrategy(...)
    fabric.launch()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for x, y in loader:
        loss = loss_fn(model(x), y)      # GMC+: evaluated at the detached point
        fabric.backward(loss)            # the hook compresses, exchanges and applies the method
        optimizer.step()                 # plain SGD on the method's direction
        optimizer.zero_grad()
    fabric.save("ckpt.pt", {"model": model, "optimizer": optimizer})  # with every rank's GMC state

The strategy does for a Fabric loop what :class:`~lightning_gmc.GMCStrategy` does for the Trainer:
it registers :func:`~lightning_gmc.gmc_hook` on the DDP module, attaches the optimizer (its momentum
and weight decay move into the method), moves the parameters to the detached point for each training
forward (``module.training`` with gradients enabled) and back after the backward, and saves and
loads the per-rank state with ``fabric.save`` / ``fabric.load``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.fabric.utilities.types import Optimizable
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gmc._adapter import (
    CHECKPOINT_KEY,
    LOGGED_METRICS,
    check_no_gradient_clipping,
    document_gmc_arguments,
    gmc_config_and_state,
    leave_swapped_points,
    logged_metrics,
    one_optimizer_error,
    rank_aggregated_metrics,
    register_strategy_names,
    run_summary,
    set_up_node_groups,
    warn_no_gmc_state,
)
from lightning_gmc.compressors import Compressor, WireDtype
from lightning_gmc.config import AutoDensity, Hierarchy, NonFinitePolicy, WorldSizeChangePolicy
from lightning_gmc.hook import gmc_hook

__all__ = ["GMCFabricStrategy"]


@document_gmc_arguments
class GMCFabricStrategy(DDPStrategy):
    """Fabric's DDP with compressed gradient communication, error feedback and global momentum.

    Set up one module with one optimizer (``fabric.setup(model, optimizer)``, or ``setup_module``
    before ``setup_optimizers``). The GMC arguments are those of :class:`~lightning_gmc.GMCStrategy`,
    validated by :class:`~lightning_gmc.GMCConfig`; ``hierarchy="node"`` takes its nodes from
    ``Fabric(num_nodes=N, devices=G)``.

    Args:
        {gmc_arguments}
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision,
            process_group_backend, timeout, start_method: as in Fabric's
            :class:`~lightning.fabric.strategies.DDPStrategy`.
        **ddp_kwargs: forwarded to :class:`torch.nn.parallel.DistributedDataParallel`
            (``bucket_cap_mb``, ``find_unused_parameters``, ``static_graph``, ...).

    Metrics: :meth:`gmc_metrics` (call it on every rank at the steps you log).
    Evaluation: wrap evaluation in ``strategy.gmc_state.evaluation_point()`` for methods that evaluate
    another model than the training parameters (e.g. CSER's average; a no-op for GMC).

    Raises:
        ValueError: what :class:`~lightning_gmc.GMCConfig` rejects; a DDP argument that conflicts with
            the hook; a second optimizer; ``fabric.clip_gradients`` with a method whose hook writes its
            update direction into ``.grad``; at ``fabric.launch()``, ``hierarchy="node"`` on a single
            node or with unequal devices per node.
        RuntimeError: at ``fabric.launch()``, ``hierarchy="node"`` with ranks the launcher does not
            number node by node.
    """

    def __init__(
        self,
        compressor: str | Compressor | None = None,
        density: float | Literal["auto"] = 0.01,
        detach: float | None = None,
        method: str = "gmc",
        momentum: float | None = None,
        seed: int = 0,
        method_options: dict[str, Any] | None = None,
        compressor_options: dict[str, Any] | None = None,
        ef_scaling: bool | None = None,
        nonfinite: NonFinitePolicy = "skip",
        on_world_size_change: WorldSizeChangePolicy = "error",
        hierarchy: Hierarchy = "flat",
        wire_dtype: WireDtype = "fp32",
        auto_density: AutoDensity | dict[str, Any] | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        # The arguments from `compressor` to `auto_density` are GMCConfig's fields, by name.
        self.gmc_config, self.gmc_state = gmc_config_and_state(type(self), locals(), ddp_kwargs)
        self.last_metrics: dict[str, float] = {}
        self._model: nn.Module | None = None
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )

    # ---------------------------------------------------------------------------------- setup
    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # fabric.launch(): the default process group exists after this
        set_up_node_groups(self.gmc_state, self)  # hierarchy="node": groups from num_nodes x devices

    @override
    def setup_module(self, module: nn.Module) -> DistributedDataParallel:
        if self._model is not None:
            raise ValueError("GMCFabricStrategy serves one module; set up a single model")
        ddp = super().setup_module(module)
        ddp.register_comm_hook(state=self.gmc_state, hook=gmc_hook)
        ddp.register_forward_pre_hook(self._enter_detached_point)
        self._model = ddp.module
        return ddp

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        if self._model is None:
            raise ValueError(
                "GMCFabricStrategy attaches the optimizer to the model's parameters: set up the model first "
                "(fabric.setup(model, optimizer), or fabric.setup_module before fabric.setup_optimizers)"
            )
        if self.gmc_state.worker is not None:
            found = "fabric.setup was given a second optimizer"
            raise one_optimizer_error("GMCFabricStrategy", self.gmc_state.method, found)
        self.gmc_state.attach(self._model, optimizer)
        rank_zero_info(run_summary(self.gmc_config, self.gmc_state))
        return optimizer

    def _enter_detached_point(self, module: nn.Module, args: Any) -> None:
        # GMC+ / DEF-A evaluate the gradient at w - s * residual: every training forward of a step
        # (micro-batches too) runs there; backward / optimizer_step restore w.
        if module.training and torch.is_grad_enabled():
            self.gmc_state.enter_detached_point()

    # ----------------------------------------------------------------------------- the step
    @override
    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        try:
            super().backward(tensor, module, *args, **kwargs)
        finally:
            self.gmc_state.exit_detached_point()

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        self.gmc_state.exit_detached_point()  # loss.backward() called without fabric.backward
        output = super().optimizer_step(optimizer, **kwargs)
        # The residual norm and the skipped buckets are read when gmc_metrics() is called.
        self.last_metrics = self.gmc_state.take_metrics(device_values=False)
        return output

    @override
    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: float | int,
        norm_type: float | int = 2.0,
        error_if_nonfinite: bool = True,
    ) -> torch.Tensor:
        check_no_gradient_clipping(self.gmc_state, f"fabric.clip_gradients(max_norm={max_norm})")
        return super().clip_gradients_norm(module, optimizer, max_norm, norm_type, error_if_nonfinite)

    @override
    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: float | int) -> None:
        check_no_gradient_clipping(self.gmc_state, f"fabric.clip_gradients(clip_val={clip_val})")
        super().clip_gradients_value(module, optimizer, clip_val)

    def gmc_metrics(self, sum_over_ranks: bool = True) -> dict[str, float]:
        """The last optimizer step's metrics as ``gmc/<name>`` (this rank), for ``fabric.log_dict``.

        With ``sum_over_ranks`` (a collective: call it on every rank at the same step) also
        ``gmc/<traffic>_sum_ranks`` and ``gmc/nonfinite_skips``, summed over all ranks.
        """
        taken = {**self.last_metrics, **self.gmc_state.device_metrics()}
        metrics = logged_metrics(taken, LOGGED_METRICS)
        if sum_over_ranks:
            group = self.gmc_state.process_group
            metrics.update(rank_aggregated_metrics(taken, group, self.root_device))
        return metrics

    # ---------------------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, nn.Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        # fabric.save runs on every rank: the collective that brings every rank's residual into
        # rank 0's file. The training parameters are the module's weights (no evaluation swap here).
        if self.gmc_state.worker is not None:
            state = {**state, CHECKPOINT_KEY: self.gmc_state.gathered_state_dict()}
        super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)

    @override
    def load_checkpoint(
        self,
        path: Any,
        state: nn.Module | Optimizer | dict[str, nn.Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        remainder = super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        if not isinstance(state, dict) or not state:
            if CHECKPOINT_KEY in remainder:  # the raw checkpoint goes back to the caller: nothing restored
                rank_zero_warn(_raw_load_warning(path, remainder[CHECKPOINT_KEY]))
            return remainder
        gmc_state = remainder.pop(CHECKPOINT_KEY, None)
        if gmc_state is not None:
            self.gmc_state.load_state_dict(gmc_state)
        elif any(isinstance(obj, Optimizer) for obj in state.values()):
            warn_no_gmc_state()
        return remainder

    @override
    def teardown(self) -> None:
        leave_swapped_points(self.gmc_state)
        super().teardown()

    # --------------------------------------------------------------------------------- registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        # Fabric's own registry (not the Trainer's): the same names and settings as the Trainer's.
        register_strategy_names(cls, strategy_registry)


def _raw_load_warning(path: Any, gmc_state: Any) -> str:
    step = gmc_state.get("step", "?") if isinstance(gmc_state, dict) else "?"
    return (
        f"lightning_gmc: fabric.load({str(path)!r}) without objects to restore returned the raw checkpoint; "
        f"its GMC state (step {step}, every rank's residual, the momentum; key {CHECKPOINT_KEY!r}) was NOT "
        f"restored, and training would restart from step 0 with zero residuals and momentum. Pass the "
        f"objects instead, after fabric.setup: fabric.load(path, {{'model': model, 'optimizer': optimizer, "
        f"...}}) restores the GMC state with them; or restore it from the raw checkpoint with "
        f"fabric.strategy.gmc_state.load_state_dict(checkpoint[{CHECKPOINT_KEY!r}])."
    )
