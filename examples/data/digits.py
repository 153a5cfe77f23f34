"""scikit-learn's bundled 8x8 handwritten digits: real data, no download."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from examples.data.partitioned import PartitionedDataModule
from examples.partition import PartitionScheme

__all__ = ["DigitsDataModule"]


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
