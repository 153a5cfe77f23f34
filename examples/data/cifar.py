"""CIFAR-10 / CIFAR-100 through torchvision, or generated images of the same shape (no files, no network)."""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from examples.data.partitioned import DataUnavailableError, PartitionedDataModule
from examples.partition import PartitionScheme

__all__ = ["CIFARDataModule", "GeneratedImageDataset"]

# Per-channel statistics of the training sets (the values commonly used for CIFAR normalisation).
_CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


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
