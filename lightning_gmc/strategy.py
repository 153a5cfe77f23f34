"""Layer 5: the Lightning adapter. Validation, hook registration, detached points, checkpoint state and
metrics; the algorithms live in the layers below."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gmc._adapter import (
    CHECKPOINT_KEY,
    LOGGED_METRICS,
    PROGRESS_BAR_METRICS,
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
from lightning_gmc._arguments import check_bool
from lightning_gmc._trainer_support import (
    CheckedMultiProcessingLauncher,
    CheckedScriptLauncher,
    optimizers_before_launch,
    show_traffic_with_units,
)
from lightning_gmc.compressors import Compressor, WireDtype
from lightning_gmc.config import AutoDensity, Hierarchy, NonFinitePolicy, WorldSizeChangePolicy
from lightning_gmc.hook import gmc_hook
from lightning_gmc.hook.binding import OptimizerBinding
from lightning_gmc.methods import Method

__all__ = ["CHECKPOINT_KEY", "GMCStrategy", "WorldSizeChangePolicy"]


@document_gmc_arguments
class GMCStrategy(DDPStrategy):
    """DDP with compressed gradient communication, error feedback and global momentum.

    ``Trainer(strategy=GMCStrategy(compressor="rbgs", detach=0.5))`` is GMC+; the default is GMC with
    exact top-k at 1 % density. The LightningModule stays unchanged: its ``torch.optim.SGD(lr,
    momentum, weight_decay)`` (per param group, any LR scheduler) is honoured, with momentum and coupled
    weight decay applied inside the method and the optimizer's own step reduced to plain SGD.
    ``method="ef"`` (strategy name ``"ef"``) is error feedback on the gradient alone and leaves any
    optimizer (Adam, AdamW, Nesterov SGD, ...) in charge of momentum, weight decay and its schedule.

    Args:
        {gmc_arguments}
        progress_bar_metrics: show ``gmc/rcc`` and the bytes this rank sent this step (``gmc/sent=808 B``;
            logged as the number ``gmc/bytes_sent``) in the progress bar; False keeps them out of it
            (they are logged either way).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend, timeout, start_method: as in
            :class:`~lightning.pytorch.strategies.DDPStrategy`.
        **ddp_kwargs: forwarded to :class:`torch.nn.parallel.DistributedDataParallel`
            (``bucket_cap_mb``, ``find_unused_parameters``, ``static_graph``, ...).

    Metrics (see docs/metrics.md): ``gmc/bytes_sent``, ``gmc/rcc``, ... per rank, every step in
    ``strategy.last_metrics``; to Lightning's loggers and ``trainer.callback_metrics`` at logging steps
    (``Trainer(log_every_n_steps)``), the first step and the last of the fit or of an epoch (each
    ``self.log`` costs about half a millisecond on a CPU), the progress bar's two every step. At
    logging steps also ``gmc/<traffic>_sum_ranks`` and ``gmc/nonfinite_skips`` summed over all ranks
    (one small all-reduce).

    Raises:
        TypeError: a keyword that is neither an argument of the strategy nor of ``DistributedDataParallel``
            (the message names the closest valid one); before any process starts, an optimizer the
            method cannot use (e.g. Adam with ``method="gmc"``).
        ValueError: unknown compressor or method (the valid names are listed), density outside
            (0, 1], negative or non-finite detach, momentum outside [0, 1), a non-finite option, or a
            DDP argument that conflicts with the hook (validation: :class:`~lightning_gmc.GMCConfig`);
            before any process starts (``Trainer.fit`` checks as it launches), gradient clipping with
            a method whose hook writes its update direction into ``.grad`` (every method but those that
            leave the step to your optimizer), ``precision="16-mixed"``, manual optimization, not
            exactly one optimizer, unsupported SGD options; ``hierarchy="node"`` on a single node or
            with unequal devices per node.
        RuntimeError: ``hierarchy="node"`` with ranks the launcher does not number node by node.

    The optimizer is checked before launch when ``configure_optimizers`` runs without the Trainer
    (most do); one that reads ``self.trainer`` is checked on every rank at fit start instead.
    """

    strategy_name = "gmc"

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
        progress_bar_metrics: bool = True,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        # The arguments from `compressor` to `auto_density` are GMCConfig's fields, by name.
        self.gmc_config, self.gmc_state = gmc_config_and_state(type(self), locals(), ddp_kwargs)
        self.gmc_method: Method = self.gmc_state.method
        self._pending_checkpoint_state: dict[str, Any] | None = None
        self._epoch_seen: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.progress_bar_metrics = check_bool("progress_bar_metrics", progress_bar_metrics)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )

    # ------------------------------------------------------------------------------ lifecycle
    @override
    def _configure_launcher(self) -> None:
        # DDPStrategy's choice of launcher, with the checks of _check_before_launch run first.
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = CheckedScriptLauncher(
                self.cluster_environment,
                self.num_processes,
                self.num_nodes,
                before_launch=self._check_before_launch,
            )
        else:
            self._launcher = CheckedMultiProcessingLauncher(
                self, start_method=self._start_method, before_launch=self._check_before_launch
            )

    def _check_before_launch(self, trainer: Trainer | None) -> None:
        """What can be checked before any rank starts (Trainer.fit has set the module by then)."""
        self._check_precision()
        module = self._lightning_module
        if trainer is None or module is None or trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_automatic_optimization(module)
        self._check_gradient_clipping(trainer, module)
        optimizers = optimizers_before_launch(module)
        if optimizers is None:
            return  # configure_optimizers needs the Trainer: checked on every rank at fit start
        if len(optimizers) != 1:
            raise one_optimizer_error("GMCStrategy", self.gmc_method, _optimizers_found(len(optimizers)))
        # The same checks as the run's own binding (optimizer kind and options, sparse gradients,
        # parameters missing from the optimizer), on a throw-away binding and optimizer.
        OptimizerBinding(self.gmc_method, self.gmc_config.momentum).attach(module, optimizers[0])

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        set_up_node_groups(self.gmc_state, self)  # hierarchy="node": groups from num_nodes x devices

    @override
    def setup(self, trainer: Trainer) -> None:
        self._check_precision()
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        module = self._training_module()
        self._check_gradient_clipping(trainer, module)
        self.gmc_state.attach(module, self.optimizers[0])
        if self.progress_bar_metrics:
            show_traffic_with_units(trainer)
        if self._pending_checkpoint_state is not None:
            self.gmc_state.load_state_dict(self._pending_checkpoint_state)
            self._pending_checkpoint_state = None
        # Lightning's rank-zero logger prints at INFO without any logging configuration.
        rank_zero_info(run_summary(self.gmc_config, self.gmc_state))

    def _check_gradient_clipping(self, trainer: Trainer, module: LightningModule) -> None:
        state = self.gmc_state
        if trainer.gradient_clip_val:
            check_no_gradient_clipping(state, f"Trainer(gradient_clip_val={trainer.gradient_clip_val})")
        if is_overridden("configure_gradient_clipping", module, LightningModule):
            check_no_gradient_clipping(state, f"{type(module).__name__}.configure_gradient_clipping")

    def _training_module(self) -> LightningModule:
        module = self.lightning_module
        assert module is not None, "setup() runs with the LightningModule connected"
        self._check_automatic_optimization(module)
        if len(self.optimizers) != 1:
            raise one_optimizer_error("GMCStrategy", self.gmc_method, _optimizers_found(len(self.optimizers)))
        return module

    @staticmethod
    def _check_automatic_optimization(module: LightningModule) -> None:
        if not module.automatic_optimization:
            raise ValueError(
                "GMCStrategy needs automatic optimization: its detached point and metrics run around "
                "Lightning's optimizer step. Set `self.automatic_optimization = True`."
            )

    def _check_precision(self) -> None:
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            raise ValueError(
                "precision='16-mixed' scales the loss with a GradScaler, so the hook would accumulate "
                "loss-scaled gradients (and overflow steps) into the residual. Use precision='bf16-mixed' "
                "or '32-true' with GMCStrategy."
            )

    @override
    def _register_ddp_hooks(self) -> None:
        # DDPStrategy registers hooks on CUDA only (a torch 1.8 limitation that no longer holds); the
        # hook works on every backend, so register it unconditionally.
        assert isinstance(self.model, DistributedDataParallel)
        self.model.register_comm_hook(state=self.gmc_state, hook=gmc_hook)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        # GMC+ / DEF-A: every micro-batch of a step sees the detached point; restored in optimizer_step.
        self.gmc_state.enter_detached_point()
        return super().training_step(*args, **kwargs)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        state = self.gmc_state

        def closure_then_restore() -> Any:
            try:
                return closure()
            finally:
                # The optimizer must update w_t, not the detached point.
                state.exit_detached_point()

        output = super().optimizer_step(optimizer, closure_then_restore, model, **kwargs)
        self._log_metrics()
        return output

    # ---------------------------------------------------------------------------------- metrics
    def _log_metrics(self) -> None:
        module = self.lightning_module
        trainer = None if module is None or module._trainer is None else module.trainer
        # Lightning's self.log costs about half a millisecond per metric on a CPU, ten metrics a
        # large share of a small model's step: each step's values go to last_metrics, and to
        # Lightning only where somebody reads them (module docstring, docs/metrics.md).
        handed = trainer is not None and _hands_metrics_to_lightning(trainer)
        metrics = self.gmc_state.take_metrics(device_values=handed)
        self.last_metrics = metrics
        if trainer is None or module is None:
            return
        # To the loggers when there are any (logging to none would only warn).
        to_logger = bool(trainer.loggers)
        shown = PROGRESS_BAR_METRICS if self.progress_bar_metrics and trainer.progress_bar_callback else ()
        others = tuple(name for name in LOGGED_METRICS if name not in shown) if handed else ()
        for names, prog_bar in ((shown, True), (others, False)):
            if names:
                values = logged_metrics(metrics, names)
                module.log_dict(values, on_step=True, on_epoch=False, logger=to_logger, prog_bar=prog_bar)
        if _is_logging_step(trainer):
            # One small all-reduce, only when the loggers write: sums over ranks of the traffic and
            # of the skipped non-finite buckets (rank 0 alone would miss the other ranks' skips).
            summed = rank_aggregated_metrics(metrics, self.gmc_state.process_group, self.root_device)
            module.log_dict(summed, on_step=True, on_epoch=False, logger=to_logger, prog_bar=False)

    # ------------------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        # Every rank runs this (Lightning's ModelCheckpoint calls it on all ranks), so it is a safe
        # point for the collective that brings every rank's residual into rank 0's file.
        gmc = self.gmc_state
        if gmc.worker is not None and "optimizer_states" in checkpoint:
            checkpoint[CHECKPOINT_KEY] = gmc.gathered_state_dict()
            if gmc.evaluation_differs:
                # The file's weights are the evaluation model (e.g. CSER's average); each rank's
                # training parameters travel in the GMC block so training resumes from them.
                checkpoint["state_dict"] = self._evaluation_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _evaluation_state_dict(self) -> dict[str, Any]:
        with self.gmc_state.evaluation_point():
            # state_dict() tensors share storage with the parameters, which leaving the evaluation
            # point overwrites in place: clone, or the file would hold the training parameters.
            return {
                key: value.detach().clone() if isinstance(value, torch.Tensor) else value
                for key, value in self.lightning_module_state_dict().items()
            }

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._pending_checkpoint_state = checkpoint.get(CHECKPOINT_KEY)
        if self._pending_checkpoint_state is None and "optimizer_states" in checkpoint:
            warn_no_gmc_state()
        return checkpoint

    # --------------------------------------------------------------------------------- registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        register_strategy_names(cls, strategy_registry)  # the same names and settings as Fabric's

    # ------------------------------------------------------------------------ evaluation point
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        module = self.lightning_module
        assert module is not None
        epoch = module.trainer.current_epoch
        if epoch != self._epoch_seen:
            self._epoch_seen = epoch
            self.gmc_method.on_epoch_start(epoch)
        super().on_train_batch_start(batch, batch_idx)

    @override
    def on_validation_start(self) -> None:
        self.gmc_state.enter_evaluation_point()
        super().on_validation_start()

    @override
    def on_validation_end(self) -> None:
        self.gmc_state.exit_evaluation_point()
        super().on_validation_end()

    @override
    def on_test_start(self) -> None:
        self.gmc_state.enter_evaluation_point()
        super().on_test_start()

    @override
    def on_test_end(self) -> None:
        self.gmc_state.exit_evaluation_point()
        super().on_test_end()

    @override
    def on_predict_start(self) -> None:
        self.gmc_state.enter_evaluation_point()
        super().on_predict_start()

    @override
    def on_predict_end(self) -> None:
        self.gmc_state.exit_evaluation_point()
        super().on_predict_end()

    @override
    def teardown(self) -> None:
        leave_swapped_points(self.gmc_state)
        super().teardown()


def _optimizers_found(count: int) -> str:
    return f"configure_optimizers returned {count}"


def _hands_metrics_to_lightning(trainer: Trainer) -> bool:
    """Whether this step's metrics go to Lightning (loggers, ``trainer.callback_metrics``): at the
    loggers' steps, the first step, and the last one of the fit or of an epoch (so that
    ``callback_metrics`` holds the run's final values)."""
    loop = trainer.fit_loop.epoch_loop
    step = loop._batches_that_stepped
    last = loop.batch_progress.is_last_batch or (0 < trainer.max_steps <= trainer.global_step + 1)
    return step == 0 or last or _is_logging_step(trainer)


def _is_logging_step(trainer: Trainer) -> bool:
    """Whether the loggers write this optimizer step (``log_every_n_steps``), decided the same way on
    every rank: Lightning's own test also logs when ``trainer.should_stop``, which is not a value
    every rank is guaranteed to share, and this decides a collective."""
    # log_every_n_steps is set by the Trainer's __init__, not declared on the class
    every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]
    if not every:
        return False
    return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0
