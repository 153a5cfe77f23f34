"""LightningDataModules for the GMC examples, with rank-based partitioning instead of DistributedSampler.

Every DataModule here splits its *training* set across ranks itself (:mod:`examples.partition`): each
rank computes the same deterministic partition from ``seed`` and keeps the shard of
``trainer.global_rank``. The Trainer must be built with ``use_distributed_sampler=False`` (all example
configs set it); :meth:`PartitionedDataModule.setup` raises if it is not, because Lightning would
otherwise split every shard again and each rank would silently train on ``1/K`` of its shard.

The evaluation set is split into disjoint contiguous slices per rank (sizes differ by at most one). All
ranks evaluate the same model, and the accuracy metric is synchronised across ranks at epoch end, so the
logged value is the accuracy on the whole evaluation set.

Data sets:

* :class:`CIFARDataModule`: CIFAR-10 / CIFAR-100 through torchvision (``download=True`` fetches it)
  with the standard augmentation; ``synthetic=True`` generates random data of the same shape instead,
  for tests and offline smoke runs.
* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits (real data, no download).
* :class:`SyntheticDataModule`: a Gaussian-mixture classification problem on feature vectors.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from examples.partition import PartitionScheme, class_histogram, format_histogram, partition_indices

__all__ = [
    "CIFARDataModule",
    "DataUnavailableError",
    "DigitsDataModule",
    "GeneratedImageDataset",
    "PartitionedDataModule",
    "SyntheticDataModule",
]

log = logging.getLogger(__name__)

# Per-channel statistics of the training sets (the values commonly used for CIFAR normalisation).
_CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


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


class GeneratedImageDataset(Dataset[tuple[Any, int]]):
    """Random images shaped like CIFAR (uint8 ``N x 32 x 32 x 3``, ``.data`` / ``.targets`` attributes).

    Each class has its own random prototype image and samples are noisy copies of it, so a model can
    learn something in a few steps. Items go through the same PIL-based transforms as torchvision's
    CIFAR, which keeps the test path identical to the real one.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        transform: Any = None,
        seed: int = 0,
        proto_seed: int = 0,
        image_size: int = 32,
    ) -> None:
        # Prototypes have their own seed so that a training and a test set can share the classes (same
        # proto_seed) while having different samples (different seed).
        protos = np.random.RandomState(proto_seed).randint(
            0, 256, size=(num_classes, image_size, image_size, 3)
        )
        protos = protos.astype(np.int16)
        gen = np.random.RandomState(seed)
        # Balanced labels in random order, so every class appears and partitions see all classes.
        targets = np.arange(num_samples) % num_classes
        gen.shuffle(targets)
        noise = gen.randint(-48, 49, size=(num_samples, image_size, image_size, 3)).astype(np.int16)
        self.data = np.clip(protos[targets] + noise, 0, 255).astype(np.uint8)
        self.targets: list[int] = targets.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img: Any = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class CIFARDataModule(PartitionedDataModule):
    """CIFAR-10 / CIFAR-100 with the standard augmentation, partitioned across ranks.

    Training transform: random crop 32 with 4-pixel padding, random horizontal flip, per-channel
    normalisation. Evaluation: normalisation only.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: torchvision root directory.
        download: let torchvision download the archive if it is missing (in :meth:`prepare_data`,
            which Lightning runs once per node).
        synthetic: use :class:`GeneratedImageDataset` of the same shape instead of the real data
            (no files, no network).
        synthetic_train_size: number of generated training images.
        synthetic_test_size: number of generated test images.
        synthetic_seed: seed of the generated images (separate from the partition ``seed``).
        augment: apply the training augmentation (crop + flip).
        **kwargs: see :class:`PartitionedDataModule`.
    """

    def __init__(
        self,
        name: Literal["cifar10", "cifar100"] = "cifar10",
        data_dir: str = "./data",
        download: bool = True,
        synthetic: bool = False,
        synthetic_train_size: int = 2048,
        synthetic_test_size: int = 512,
        synthetic_seed: int = 0,
        augment: bool = True,
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
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            partition=partition,
            alpha=alpha,
            seed=seed,
            drop_remainder=drop_remainder,
            drop_last=drop_last,
            num_shards=num_shards,
            shard_index=shard_index,
        )
        if name not in _CIFAR_CLASSES:
            raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
        self.name = name
        self.data_dir = data_dir
        self.download = download
        self.synthetic = synthetic
        self.synthetic_train_size = synthetic_train_size
        self.synthetic_test_size = synthetic_test_size
        self.synthetic_seed = synthetic_seed
        self.augment = augment
        self.num_classes = _CIFAR_CLASSES[name]

    def transforms(self) -> tuple[Any, Any]:
        """(train, eval) torchvision transforms."""
        from torchvision import transforms as T

        mean, std = _CIFAR_STATS[self.name]
        norm = [T.ToTensor(), T.Normalize(mean, std)]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        return T.Compose(aug + norm), T.Compose(norm)

    def _dataset_class(self) -> Any:
        from torchvision import datasets

        return datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100

    def files_present(self) -> bool:
        """Whether every archive member torchvision reads is in ``data_dir`` (no checksum, no network)."""
        cls = self._dataset_class()
        folder = os.path.join(os.path.expanduser(self.data_dir), cls.base_folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name, _ in cls.train_list + cls.test_list)

    def _unavailable(self, reason: str) -> DataUnavailableError:
        cls = self._dataset_class()
        root = os.path.abspath(os.path.expanduser(self.data_dir))
        return DataUnavailableError(
            f"{self.name.upper()} not found: expected the extracted archive in "
            f"{os.path.join(root, cls.base_folder)} ({reason}). Either let it download while online "
            f"(data.download: true) or fetch {cls.url} and extract it into {root}, point --data.data_dir "
            "at an existing copy, or train on generated data of the same shape with "
            "--data.synthetic=true (no files, no network)."
        )

    def ensure_available(self) -> None:
        """Make sure the data set is on disk, downloading it if allowed; otherwise fail with the fix.

        ``examples/train.py`` calls this in the launching process before any rank starts, so an
        offline run fails once, with one message, instead of once per rank.

        Raises:
            DataUnavailableError: the files are missing and ``download`` is off or the download failed.
        """
        if self.synthetic or self.files_present():
            return
        if not self.download:
            raise self._unavailable("download is off")
        cls = self._dataset_class()
        try:
            cls(self.data_dir, train=True, download=True)
            cls(self.data_dir, train=False, download=True)
        except Exception as exc:  # offline, torchvision raises URLError, OSError or RuntimeError
            raise self._unavailable(f"the download from {cls.url} failed: {exc}") from exc

    def prepare_data(self) -> None:
        """Download once per node (Lightning calls this on local rank 0 only)."""
        if self.synthetic or not self.download:
            return
        self.ensure_available()

    def _load(self) -> tuple[Dataset[Any], np.ndarray, Dataset[Any]]:
        train_tf, eval_tf = self.transforms()
        if self.synthetic:
            # Same class prototypes, different samples for train and test.
            s = self.synthetic_seed
            train = GeneratedImageDataset(
                self.synthetic_train_size, self.num_classes, train_tf, seed=2 * s, proto_seed=s
            )
            test = GeneratedImageDataset(
                self.synthetic_test_size, self.num_classes, eval_tf, seed=2 * s + 1, proto_seed=s
            )
            return train, np.asarray(train.targets), test
        if not self.files_present():
            raise self._unavailable("download is off" if not self.download else "the download did not run")
        cls = self._dataset_class()
        # download=False here: prepare_data() already fetched it on one process per node, and a second
        # concurrent download from every rank would race on the same files.
        train = cls(self.data_dir, train=True, download=False, transform=train_tf)
        test = cls(self.data_dir, train=False, download=False, transform=eval_tf)
        return train, np.asarray(train.targets), test


class DigitsDataModule(PartitionedDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download).

    Pixels (0..16) are scaled to [0, 1] and shaped ``1 x 8 x 8``. A stratified split gives
    ``train_size`` training images (default 1440, divisible by 2, 4, 8 and 16 so that IID shards cover
    all of them) and the remaining 357 for evaluation.

    Args:
        train_size: number of training images.
        split_seed: seed of the train/test split (kept separate from the partition seed so that changing
            the partition does not change the test set).
        **kwargs: see :class:`PartitionedDataModule`.
    """

    num_classes = 10

    def __init__(
        self,
        train_size: int = 1440,
        split_seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        partition: PartitionScheme = "iid",
        alpha: float = 0.1,
        seed: int = 0,
        drop_remainder: bool = True,
        drop_last: bool = False,
        num_shards: int | None = None,
        shard_index: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            partition=partition,
            alpha=alpha,
            seed=seed,
            drop_remainder=drop_remainder,
            drop_last=drop_last,
            num_shards=num_shards,
            shard_index=shard_index,
        )
        self.train_size = train_size
        self.split_seed = split_seed

    def _load(self) -> tuple[Dataset[Any], np.ndarray, Dataset[Any]]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, train_size=self.train_size, stratify=y, random_state=self.split_seed
        )
        train = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long())
        test = TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te).long())
        return train, np.asarray(y_tr), test


class SyntheticDataModule(PartitionedDataModule):
    """Gaussian mixture: class ``c`` is ``N(mu_c, I)`` in ``num_features`` dimensions.

    The class means are drawn once from ``N(0, separation^2 I)``; larger ``separation`` makes the
    problem easier. Train and test samples come from the same mixture.

    Args:
        num_features: input dimension.
        num_classes: number of classes.
        train_size: number of training samples.
        test_size: number of test samples.
        separation: scale of the class means relative to the unit noise.
        data_seed: seed of the generated data (separate from the partition ``seed``).
        **kwargs: see :class:`PartitionedDataModule`.
    """

    def __init__(
        self,
        num_features: int = 32,
        num_classes: int = 4,
        train_size: int = 1024,
        test_size: int = 256,
        separation: float = 1.0,
        data_seed: int = 0,
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
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            partition=partition,
            alpha=alpha,
            seed=seed,
            drop_remainder=drop_remainder,
            drop_last=drop_last,
            num_shards=num_shards,
            shard_index=shard_index,
        )
        self.num_features = num_features
        self.num_classes = num_classes
        self.train_size = train_size
        self.test_size = test_size
        self.separation = separation
        self.data_seed = data_seed

    def _load(self) -> tuple[Dataset[Any], np.ndarray, Dataset[Any]]:
        gen = np.random.RandomState(self.data_seed)
        means = gen.normal(0.0, self.separation, size=(self.num_classes, self.num_features))

        def sample(n: int) -> tuple[torch.Tensor, np.ndarray]:
            y = np.arange(n) % self.num_classes
            gen.shuffle(y)
            x = means[y] + gen.normal(size=(n, self.num_features))
            return torch.from_numpy(x.astype(np.float32)), y

        x_tr, y_tr = sample(self.train_size)
        x_te, y_te = sample(self.test_size)
        train = TensorDataset(x_tr, torch.from_numpy(y_tr).long())
        test = TensorDataset(x_te, torch.from_numpy(y_te).long())
        return train, y_tr, test
