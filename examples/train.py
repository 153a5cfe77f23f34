"""LightningCLI entry point for the GMC examples.

    python examples/train.py fit --config examples/configs/table2/cifar10_noniid_resnet20gn_gmc.yaml
    python examples/train.py fit --config examples/configs/digits/gmc_noniid.yaml --trainer.strategy=gmc

After ``fit`` it tests the trained model and prints ``final test accuracy: ...`` (rank 0).
``lightning-gmc fit digits/gmc_noniid`` runs the same (from a clone of the repository).

The configs under ``examples/configs/`` spell out every value (strategy via ``class_path`` /
``init_args``, data partition, optimiser, schedule). Importing :mod:`lightning_gmc` registers the bare
strategy names (``gmc``, ``gmc_plus``, and one per method), so ``--trainer.strategy=gmc`` works too.

The DataModules partition the data across ranks themselves, so every config sets
``trainer.use_distributed_sampler: false``; the DataModule refuses to run without it on more than one
rank.

Before ``Trainer.fit`` launches any rank, the CLI makes sure the data is on disk (downloading it once
when the config allows): offline, a paper config fails once with a message that names the data path,
the download and ``--data.synthetic=true``, instead of once per rank. On a laptop, without the data::

    python examples/train.py fit --config examples/configs/table1/cifar10_iid_resnet20bn_gmc.yaml \
        --data.synthetic=true --trainer.accelerator=cpu --trainer.devices=2
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script (``python examples/train.py``) the repository root is not on sys.path; add it so that
# ``examples`` and an uninstalled ``lightning_gmc`` import.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from lightning.pytorch.cli import LightningCLI  # noqa: E402

import lightning_gmc  # noqa: E402,F401  (registers the "gmc", "gmc_plus", ... strategy names)
from examples.data import DataUnavailableError, PartitionedDataModule  # noqa: E402
from examples.models import ClassificationModule  # noqa: E402


def _show_example_logs() -> None:
    """Print the examples' INFO messages (the per-rank class histogram) unless logging is configured."""
    logger = logging.getLogger("examples")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class ExamplesCLI(LightningCLI):
    """LightningCLI that checks the data in the launching process, before any rank starts, and, with
    ``test_after_fit``, tests the trained model and prints its test accuracy after ``fit``."""

    def __init__(self, *args: Any, test_after_fit: bool = False, **kwargs: Any) -> None:
        self.test_after_fit = test_after_fit
        super().__init__(*args, **kwargs)

    def after_fit(self) -> None:
        if not self.test_after_fit or self.trainer.interrupted:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        accuracy = results[0].get("test/acc") if results else None
        if accuracy is not None and self.trainer.is_global_zero:
            steps = self.trainer.global_step
            print(f"final test accuracy: {100 * float(accuracy):.2f}% (after {steps} training steps)")

    def before_fit(self) -> None:
        # Only the launching process (or, under an external launcher such as torchrun, local rank 0):
        # concurrent downloads from every rank of a node would race on the same files.
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            return
        ensure_available = getattr(self.datamodule, "ensure_available", None)
        if ensure_available is not None:
            ensure_available()


def cli_main(
    args: Sequence[str] | None = None, run: bool = True, test_after_fit: bool = False, **kwargs: Any
) -> LightningCLI:
    """Build (and with ``run=True`` execute) the CLI; ``args`` defaults to ``sys.argv[1:]``.
    ``test_after_fit`` (the command line's choice) tests after ``fit`` and prints the test accuracy."""
    _show_example_logs()
    return ExamplesCLI(
        ClassificationModule,
        PartitionedDataModule,
        test_after_fit=test_after_fit,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        # Repeated runs into the same log directory (e.g. fast_dev_run smoke tests) must not fail.
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )


if __name__ == "__main__":
    try:
        cli_main(test_after_fit=True)
    except DataUnavailableError as exc:
        sys.exit(f"error: {exc}")
