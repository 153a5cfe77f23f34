"""LightningDataModules for the GMC examples, with rank-based partitioning instead of DistributedSampler.

Every DataModule here splits its *training* set across ranks itself (:mod:`examples.partition`) and
needs a Trainer built with ``use_distributed_sampler=False`` (all example configs set it); see
:mod:`examples.data.partitioned` for how the training and evaluation sets are split.

Data sets (import them from here: the configs' ``class_path`` is ``examples.data.<name>``):

* :class:`CIFARDataModule` (:mod:`examples.data.cifar`): CIFAR-10 / CIFAR-100 through torchvision
  (``download=True`` fetches it) with the standard augmentation; ``synthetic=True`` generates random
  data of the same shape instead, for tests and offline smoke runs.
* :class:`DigitsDataModule` (:mod:`examples.data.digits`): scikit-learn's bundled 8x8 digits (real
  data, no download).
* :class:`SyntheticDataModule` (:mod:`examples.data.synthetic`): a Gaussian-mixture classification
  problem on feature vectors.

Their base class, :class:`PartitionedDataModule`, and :class:`DataUnavailableError` are in
:mod:`examples.data.partitioned`.
"""

from __future__ import annotations

from examples.data.cifar import CIFARDataModule, GeneratedImageDataset
from examples.data.digits import DigitsDataModule
from examples.data.partitioned import DataUnavailableError, PartitionedDataModule
from examples.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFARDataModule",
    "DataUnavailableError",
    "DigitsDataModule",
    "GeneratedImageDataset",
    "PartitionedDataModule",
    "SyntheticDataModule",
]
