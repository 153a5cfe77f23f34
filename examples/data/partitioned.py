"""The base of the example DataModules: rank-based partitioning instead of DistributedSampler.

Every DataModule of :mod:`examples.data` splits its *training* set across ranks itself
(:mod:`examples.partition`): each rank computes the same deterministic partition from ``seed`` and
keeps the shard of ``trainer.global_rank``. The Trainer must be built with
``use_distributed_sampler=False`` (all example configs set it); :meth:`PartitionedDataModule.setup`
raises if it is not, because Lightning would otherwise split every shard again and each rank would
silently train on ``1/K`` of its shard.

The evaluation set is split into disjoint contiguous slices per rank (sizes differ by at most one). All
ranks evaluate the same model, and the accuracy metric is synchronised across ranks at epoch end, so the
logged value is the accuracy on the whole evaluation set.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from examples.partition import PartitionScheme, class_histogram, format_histogram, partition_indices

__all__ = ["DataUnavailableError", "PartitionedDataModule"]

# The package's logger, "examples.data": the one users and tests configure for the partition histograms.
log = logging.getLogger(__package__)


class DataUnavailableError(RuntimeError):
    """The data set is not on disk and could not be downloaded; the message says how to fix it."""


class PartitionedDataModule(LightningDataModule):
    """Base class: loads the full data sets once, then keeps this rank's shard.

    Subclasses implement :meth:`_load`, returning ``(train_dataset, train_labels, eval_dataset)``.

    Args:
        batch_size: mini-batch size *per rank* (the paper: 8 ranks x 16 = 128 in total).
        eval_batch_size: batch size for validation and test.
        num_workers: DataLoader worker processes per rank.
        partition: ``"iid"`` or ``"dirichlet"`` (non-IID, Lin et al.).
        alpha: Dirichlet concentration for ``partition="dirichlet"``.
        seed: partition seed; identical on every rank so that the shards are consistent.
        drop_remainder: give every rank ``floor(N / K)`` samples (see :mod:`examples.partition`).
        drop_last: drop the last incomplete training batch of every epoch.
        num_shards: override the number of shards (default: the Trainer's world size). Useful for
            simulating ``K`` workers in one process.
        shard_index: override which shard this process uses (default: the Trainer's global rank).
    """

    num_classes: int = 0

    def __init__(
        self,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        partition: PartitionScheme = "iid",
        alpha: float = 0.1,
        seed: int = 0,
        drop_remainder: bool = True,
        drop_last: bool = False,
        num_shards: int | None = None,
        shard_index: int | None = None,
    ) -> None:
        super().__init__()
        if partition not in ("iid", "dirichlet"):
            raise ValueError(f"partition must be 'iid' or 'dirichlet', got {partition!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.partition = partition
        self.alpha = alpha
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.drop_last = drop_last
        self.num_shards = num_shards
        self.shard_index = shard_index

        self.train_full: Dataset[Any] | None = None
        self.train_labels: np.ndarray | None = None
        self.eval_full: Dataset[Any] | None = None
        self.parts: list[np.ndarray] | None = None
        self.histogram: np.ndarray | None = None
        self.train_shard: Dataset[Any] | None = None
        self.eval_shard: Dataset[Any] | None = None
        self._logged_histogram = False

    # -- hooks for subclasses ------------------------------------------------------------------------
    def _load(self) -> tuple[Dataset[Any], np.ndarray, Dataset[Any]]:
        """Return the full training set, its labels (for partitioning) and the evaluation set."""
        raise NotImplementedError

    # -- rank handling -------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer  # a plain attribute on LightningDataModule (None when not attached)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if trainer is not None and world > 1:
            connector = getattr(trainer, "_accelerator_connector", None)
            if getattr(connector, "use_distributed_sampler", False):
                raise RuntimeError(
                    f"{type(self).__name__} partitions the data across ranks itself; create the Trainer with "
                    "use_distributed_sampler=False (otherwise every shard is split a second time)"
                )
        if self.num_shards is not None:
            world = self.num_shards
        if self.shard_index is not None:
            rank = self.shard_index
        if not 0 <= rank < world:
            raise ValueError(f"shard index {rank} out of range for {world} shards")
        return rank, world

    def setup(self, stage: str | None = None) -> None:
        """Load the data (once) and select this rank's training shard and evaluation slice."""
        if self.train_full is None:
            self.train_full, self.train_labels, self.eval_full = self._load()
        assert self.train_labels is not None and self.eval_full is not None
        rank, world = self._rank_and_world()
        self.parts = partition_indices(
            self.train_labels,
            world,
            scheme=self.partition,
            alpha=self.alpha,
            seed=self.seed,
            drop_remainder=self.drop_remainder,
        )
        self.histogram = class_histogram(self.train_labels, self.parts, self.num_classes)
        self.train_shard = Subset(self.train_full, self.parts[rank].tolist())
        eval_slices = np.array_split(np.arange(len(self.eval_full)), world)  # type: ignore[arg-type]
        self.eval_shard = Subset(self.eval_full, eval_slices[rank].tolist())
        self._log_histogram(rank, world)

    def _log_histogram(self, rank: int, world: int) -> None:
        # Every rank knows the whole partition, so rank 0 alone logs all shards' histograms, and only on
        # the first setup() (fit then test would otherwise log it twice).
        if self._logged_histogram or rank != 0 or self.histogram is None:
            return
        self._logged_histogram = True
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "logger", None) is not None:
            # Also into the run's logger (hparams.yaml for CSV/TensorBoard) so the split is recorded with
            # the results it produced.
            trainer.logger.log_hyperparams(
                {
                    "data/partition": self.partition,
                    "data/alpha": self.alpha,
                    "data/partition_seed": self.seed,
                    "data/class_histogram": self.histogram.tolist(),
                }
            )
        log.info(
            "%s: %s partition (alpha=%s, seed=%d) over %d ranks, class histogram per rank:\n%s",
            type(self).__name__,
            self.partition,
            self.alpha if self.partition == "dirichlet" else "-",
            self.seed,
            world,
            format_histogram(self.histogram),
        )

    def shard(self, index: int) -> Dataset[Any]:
        """Training shard ``index`` (after :meth:`setup`); lets a single-process simulator use all shards."""
        if self.parts is None or self.train_full is None:
            raise RuntimeError("call setup() first")
        return Subset(self.train_full, self.parts[index].tolist())

    # -- loaders -------------------------------------------------------------------------------------
    def _loader(self, data: Dataset[Any] | None, batch_size: int, train: bool) -> DataLoader[Any]:
        if data is None:
            raise RuntimeError("call setup() first")
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=train,
            drop_last=self.drop_last if train else False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """This rank's shard, reshuffled every epoch."""
        return self._loader(self.train_shard, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader[Any]:
        """This rank's slice of the evaluation set (the test split: the paper reports test accuracy)."""
        return self._loader(self.eval_shard, self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader[Any]:
        """Same slice as :meth:`val_dataloader`."""
        return self._loader(self.eval_shard, self.eval_batch_size, train=False)
