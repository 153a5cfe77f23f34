"""Partition properties and the example DataModules (examples/partition.py, examples/data/)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# The examples are a top-level package next to lightning_gmc, not installed: make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.data import CIFARDataModule, DigitsDataModule, SyntheticDataModule  # noqa: E402
from examples.partition import (  # noqa: E402
    class_histogram,
    dirichlet_partition,
    iid_partition,
    partition_indices,
)

# --------------------------------------------------------------------------------------------------
# helpers


def _labels(n: int, classes: int, seed: int = 123) -> np.ndarray:
    """Balanced labels in random order."""
    y = np.arange(n) % classes
    np.random.RandomState(seed).shuffle(y)
    return y


def _assert_disjoint(parts: list[np.ndarray]) -> None:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "a sample appears in two shards (or twice in one)"


def _mean_tv_to_global(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    """Mean over shards of the total-variation distance between shard and global class distributions."""
    glob = np.bincount(labels, minlength=classes) / len(labels)
    tvs = []
    for p in parts:
        local = np.bincount(labels[p], minlength=classes) / len(p)
        tvs.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(tvs))


def _reference_lin_dirichlet(labels: np.ndarray, k: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Lin et al.'s steps 1-4 (docs/algorithms.md 4.1) for one group (K <= 10), transcribed for this test.

    Loop structure follows that description literally: shuffle (index, label) rows; redraw until every
    worker holds >= int(0.5 N / K); per class p ~ Dir(alpha), zero full workers (>= N / K), renormalise,
    split at floor(cumsum(p) * n_c); concatenate; cut into K chunks of int(N / K).
    """
    rs = np.random.RandomState(seed)
    n = len(labels)
    rows = np.array(list(enumerate(labels.tolist())), dtype=np.int64)
    rs.shuffle(rows)
    sizes = [0]
    while min(sizes) < int(0.5 * n / k):
        buckets: list[list[int]] = [[] for _ in range(k)]
        for c in range(int(labels.max()) + 1):
            members = rows[rows[:, 1] == c][:, 0]
            p = rs.dirichlet([alpha] * k)
            p = np.array([pj if len(bj) < n / k else 0.0 for pj, bj in zip(p, buckets, strict=True)])
            p = p / p.sum()
            bounds = [0] + [int(v) for v in (np.cumsum(p) * len(members))[:-1]] + [len(members)]
            for j in range(k):
                buckets[j] += members[bounds[j] : bounds[j + 1]].tolist()
        sizes = [len(b) for b in buckets]
    flat = [i for b in buckets for i in b]
    size = n // k
    return [np.array(flat[j * size : (j + 1) * size]) for j in range(k)]


# --------------------------------------------------------------------------------------------------
# partitions


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("k", [1, 2, 8, 16])
def test_partition_disjoint_covering_equal(scheme: str, k: int) -> None:
    y = _labels(4000, 10)  # 4000 is divisible by every k here, so equal sizes and covering both hold
    parts = partition_indices(y, k, scheme=scheme, alpha=0.1, seed=3)
    assert len(parts) == k
    assert [len(p) for p in parts] == [4000 // k] * k
    _assert_disjoint(parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(4000))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_remainder(scheme: str) -> None:
    y = _labels(1797, 10)  # digits size; 1797 = 8 * 224 + 5
    parts = partition_indices(y, 8, scheme=scheme, seed=0, drop_remainder=True)
    assert [len(p) for p in parts] == [224] * 8
    _assert_disjoint(parts)
    assert len(np.concatenate(parts)) == 1797 - 5
    parts = partition_indices(y, 8, scheme=scheme, seed=0, drop_remainder=False)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    _assert_disjoint(parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1797))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_deterministic_from_seed(scheme: str) -> None:
    y = _labels(2000, 10)
    a = partition_indices(y, 8, scheme=scheme, seed=7)
    b = partition_indices(y, 8, scheme=scheme, seed=7)
    c = partition_indices(y, 8, scheme=scheme, seed=8)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_dirichlet_matches_independent_transcription_of_spec() -> None:
    for n, classes, k, alpha, seed in [(2000, 10, 8, 0.1, 0), (1440, 10, 2, 0.1, 1), (3000, 20, 5, 0.5, 2)]:
        y = _labels(n, classes, seed=seed + 10)
        ours = dirichlet_partition(y, k, alpha=alpha, seed=seed)
        ref = _reference_lin_dirichlet(y, k, alpha, seed)
        for a, b in zip(ours, ref, strict=True):
            assert np.array_equal(a, b)


def test_dirichlet_groups_of_ten() -> None:
    # K = 16 (step 1): workers 0-9 form the first group and only draw from the first int(10/16 * N)
    # shuffled rows; the group's lists come first in the concatenation, so after the equal cut (step 4)
    # shards 0-9 hold exactly those rows.
    y = _labels(3200, 10)
    parts = dirichlet_partition(y, 16, alpha=0.1, seed=0)
    assert [len(p) for p in parts] == [200] * 16
    _assert_disjoint(parts)
    rows = np.stack([np.arange(3200), y], axis=1)
    np.random.RandomState(0).shuffle(rows)
    first_group_rows = set(rows[: int(10 / 16 * 3200), 0].tolist())
    assert set(np.concatenate(parts[:10]).tolist()) == first_group_rows
    assert _mean_tv_to_global(y, parts, 10) > 0.3


def test_non_iid_is_skewed_and_iid_is_not() -> None:
    y = _labels(10000, 10)
    iid = iid_partition(len(y), 8, seed=0)
    non = dirichlet_partition(y, 8, alpha=0.1, seed=0)
    near_iid = dirichlet_partition(y, 8, alpha=1000.0, seed=0)
    tv_iid = _mean_tv_to_global(y, iid, 10)
    tv_non = _mean_tv_to_global(y, non, 10)
    tv_big_alpha = _mean_tv_to_global(y, near_iid, 10)
    # IID shards of 1250 samples: the sampling noise alone gives TV of a few percent.
    assert tv_iid < 0.06
    assert tv_non > 5 * tv_iid
    assert tv_non > 0.3
    # A huge concentration is nearly uniform again: skew comes from alpha, not from the procedure.
    assert tv_big_alpha < 0.1
    # Fewer classes per shard under Dir(0.1).
    hist_non = class_histogram(y, non, 10)
    hist_iid = class_histogram(y, iid, 10)
    assert (hist_iid > 0).sum(1).min() == 10
    assert (hist_non > 0).sum(1).mean() < 9


def test_class_histogram_counts() -> None:
    y = np.array([0, 1, 1, 2, 2, 2])
    h = class_histogram(y, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert h.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]


def test_partition_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        partition_indices(np.zeros(3, dtype=int), 4)
    with pytest.raises(ValueError):
        partition_indices(np.zeros(30, dtype=int), 2, scheme="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dirichlet_partition(np.zeros(30, dtype=int), 2, alpha=0.0)


# --------------------------------------------------------------------------------------------------
# DataModules


def test_digits_shards_select_by_rank_and_cover() -> None:
    k = 4
    shards = []
    for r in range(k):
        dm = DigitsDataModule(partition="dirichlet", alpha=0.1, seed=5, num_shards=k, shard_index=r)
        dm.setup("fit")
        assert dm.train_shard is not None and dm.eval_shard is not None
        shards.append(np.asarray(dm.train_shard.indices))  # type: ignore[attr-defined]
        assert len(dm.train_shard) == 1440 // k
    _assert_disjoint(shards)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(1440))
    x, y = dm.train_shard[0]
    assert (
        x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    )
    assert dm.eval_full is not None and len(dm.eval_full) == 1797 - 1440


def test_datamodule_uses_trainer_rank_and_world() -> None:
    dm = DigitsDataModule(partition="iid", seed=0)
    ref = iid_partition(1440, 2, seed=0)
    for rank in range(2):
        dm.trainer = SimpleNamespace(  # type: ignore[assignment]
            global_rank=rank,
            world_size=2,
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=False),
        )
        dm.setup("fit")
        assert np.array_equal(np.asarray(dm.train_shard.indices), ref[rank])  # type: ignore[union-attr]
        assert len(dm.eval_shard) in (178, 179)  # type: ignore[arg-type]
    dm.trainer = SimpleNamespace(  # type: ignore[assignment]
        global_rank=0, world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(RuntimeError, match="use_distributed_sampler=False"):
        dm.setup("fit")


def test_histogram_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="examples.data")
    dm = SyntheticDataModule(partition="dirichlet", num_shards=4, shard_index=0)
    dm.setup("fit")
    dm.setup("test")
    records = [r for r in caplog.records if "class histogram" in r.getMessage()]
    assert len(records) == 1
    assert "rank" in records[0].getMessage()
    # A non-zero shard index does not log (only rank 0 reports every rank's histogram).
    caplog.clear()
    dm1 = SyntheticDataModule(partition="dirichlet", num_shards=4, shard_index=1)
    dm1.setup("fit")
    assert not [r for r in caplog.records if "class histogram" in r.getMessage()]


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_generated_data_shapes(name: str, classes: int) -> None:
    dm = CIFARDataModule(
        name=name,  # type: ignore[arg-type]
        synthetic=True,
        synthetic_train_size=400,
        synthetic_test_size=100,
        batch_size=8,
        partition="dirichlet",
        num_shards=2,
        shard_index=1,
    )
    dm.prepare_data()  # must not touch the network in synthetic mode
    dm.setup("fit")
    assert dm.num_classes == classes
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32
    assert yb.dtype == torch.int64 and int(yb.max()) < classes
    xe, _ = next(iter(dm.val_dataloader()))
    assert xe.shape[1:] == (3, 32, 32)
    assert len(dm.train_shard) == 200  # type: ignore[arg-type]
    # Normalised with the CIFAR statistics: roughly zero-centred, not in [0, 1].
    assert float(xb.min()) < 0.0


def test_cifar_real_path_without_files_fails_cleanly(tmp_path: Path) -> None:
    # download=False on an empty directory: torchvision's own "not found" error, no network access.
    dm = CIFARDataModule(name="cifar10", data_dir=str(tmp_path), download=False)
    dm.prepare_data()
    with pytest.raises(RuntimeError, match="not found"):
        dm.setup("fit")


def test_synthetic_datamodule() -> None:
    dm = SyntheticDataModule(num_features=12, num_classes=3, train_size=300, test_size=60, batch_size=10)
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (10, 12) and int(yb.max()) < 3
    assert len(dm.train_shard) == 300  # type: ignore[arg-type]
