"""Trainer-only pieces of the Lightning adapter: checks that run before any process starts, and the
progress bar's byte counts with a unit.

Before launch. ``Trainer.fit`` hands the LightningModule to the strategy and then calls
``strategy.launcher.launch(...)``, which starts the other ranks (the default ``popen`` launcher starts
``devices - 1`` copies of the script; ``spawn`` starts them all). That call is the earliest point where
both the Trainer's settings and the module are known, so :class:`GMCStrategy` uses launchers whose
``launch`` first runs its checks: a wrong optimizer or gradient clipping is reported in about a second,
in the launching process, and no rank starts. Under an external launcher (torchrun, SLURM) each rank
runs the same checks before it joins the process group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.core.optimizer import _configure_optimizers
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gmc._adapter import format_bytes

__all__ = [
    "CheckedMultiProcessingLauncher",
    "CheckedScriptLauncher",
    "optimizers_before_launch",
    "show_traffic_with_units",
]

#: called with the Trainer as ``launch`` starts, before any process is created
BeforeLaunch = Callable[[Trainer | None], None]


class CheckedScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's ``popen`` launcher (one script per rank) that runs ``before_launch`` first."""

    def __init__(self, *args: Any, before_launch: BeforeLaunch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_launch = before_launch

    @override
    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        self.before_launch(trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)


class CheckedMultiProcessingLauncher(_MultiProcessingLauncher):
    """Lightning's ``spawn`` / ``fork`` / ``forkserver`` launcher that runs ``before_launch`` first."""

    def __init__(self, *args: Any, before_launch: BeforeLaunch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_launch = before_launch

    @override
    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        self.before_launch(trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)


def optimizers_before_launch(module: LightningModule) -> list[Optimizer] | None:
    """The optimizers ``module.configure_optimizers()`` returns, called with no Trainer attached; None
    when that cannot tell (it needs the Trainer, e.g. ``self.trainer.estimated_stepping_batches``, or
    the model is built in ``configure_model``).

    The optimizers are throw-away objects over the module's parameters: the run creates its own after
    launch. The module is detached from any Trainer during the call, so that a hook reading the
    Trainer fails here (and is skipped) instead of loading data before the processes exist.
    """
    if is_overridden("configure_model", module, LightningModule):
        return None  # the parameters do not exist yet
    trainer = module._trainer
    module.trainer = None
    try:
        configured: Any = module.configure_optimizers()
        if configured is None:
            return None  # Lightning runs without an optimizer (and says so)
        optimizers, _, _ = _configure_optimizers(configured)
    except Exception:  # noqa: BLE001 - whatever the hook needs, the check after launch reports it
        return None
    finally:
        module.trainer = trainer
    return list(optimizers)


def show_traffic_with_units(trainer: Trainer) -> None:
    """Show ``gmc/bytes_sent`` in the progress bar as ``gmc/sent=808 B`` (or ``kB``, ``MB``, ...).

    Only the text the bar shows changes: the logged metric and ``trainer.progress_bar_metrics`` keep
    the raw number. Lightning's bars (TQDM and Rich) read their values through ``get_metrics``, which
    this wraps on the Trainer's progress-bar instance (once); a custom bar that overrides
    ``get_metrics`` is wrapped too, a bar that reads the metrics elsewhere shows the raw number.
    """
    bar = trainer.progress_bar_callback
    if not isinstance(bar, ProgressBar) or getattr(bar, "_lightning_gmc_units", False):
        return
    shown = bar.get_metrics

    def get_metrics(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = dict(shown(trainer, pl_module))
        sent = metrics.pop("gmc/bytes_sent", None)
        if isinstance(sent, int | float):
            metrics["gmc/sent"] = format_bytes(sent)
        return metrics

    bar.get_metrics = get_metrics  # type: ignore[method-assign]
    bar._lightning_gmc_units = True  # type: ignore[attr-defined]
