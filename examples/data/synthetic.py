"""A generated Gaussian-mixture classification problem on feature vectors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from examples.data.partitioned import PartitionedDataModule
from examples.partition import PartitionScheme

__all__ = ["SyntheticDataModule"]


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
