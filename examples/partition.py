"""Split a labelled data set across data-parallel ranks: IID and non-IID Dirichlet(alpha).

These functions replace :class:`torch.utils.data.DistributedSampler`. Every rank computes the *same*
partition from the same seed (no communication is needed, unlike the reference code, which builds the
indices on rank 0 and broadcasts them) and then keeps only its own shard. The Trainer must therefore be
created with ``use_distributed_sampler=False``; otherwise Lightning would split each shard a second
time.

Schemes (``docs/algorithms.md``, section 4.1):

* ``"iid"``: a random permutation cut into ``K`` equal contiguous chunks ("random equal split").
* ``"dirichlet"``: the procedure of Lin et al. (2021), in five steps:

  1. shuffle the (index, label) pairs; handle workers in groups of at most 10, each group taking a
     contiguous slice of the shuffled pairs proportional to its size (with ``K <= 10``: one group);
  2. repeat until every worker of the group holds at least ``0.5 * n_g / K_g`` samples: for each
     class draw ``p ~ Dir(alpha * 1)``, zero ``p_j`` for workers that already hold ``>= n_g / K_g``
     samples, renormalise, and split that class's indices at ``floor(cumsum(p) * n_c)``;
  3. concatenate the per-worker lists in worker order;
  4. cut the concatenation into ``K`` equal contiguous chunks (so the final shards have equal sizes
     but are *not* exactly the Dirichlet assignment: this is what the reference does);
  5. (broadcast from rank 0: replaced by deterministic recomputation on every rank.)

With ``drop_remainder=True`` (the default, as in the reference code and in
``DistributedSampler(drop_last=True)``) every shard has ``floor(N / K)`` samples and the last
``N mod K < K`` samples of the arrangement are unused. Equal shard sizes matter in data-parallel
training: ranks with different numbers of batches would leave the collectives waiting for each other.
With ``drop_remainder=False`` the shards cover all ``N`` samples and their sizes differ by at most one.

The RNG is ``numpy.random.RandomState(seed)`` and it is consumed in the same order as the reference
(one row shuffle, then one Dirichlet draw per class per attempt), so results are reproducible across
machines and numpy versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "PartitionScheme",
    "class_histogram",
    "dirichlet_partition",
    "format_histogram",
    "iid_partition",
    "partition_indices",
]

PartitionScheme = Literal["iid", "dirichlet"]

# Lin et al. process workers in groups of this many; kept as a constant because the group layout
# changes which samples each worker may receive, so it is part of the procedure, not a tuning knob.
_GROUP_SIZE = 10


def _cut_equal(order: np.ndarray, num_parts: int, drop_remainder: bool) -> list[np.ndarray]:
    """Cut an arrangement of indices into ``num_parts`` contiguous chunks (step 4 above)."""
    if drop_remainder:
        size = len(order) // num_parts
        return [order[i * size : (i + 1) * size].copy() for i in range(num_parts)]
    return [chunk.copy() for chunk in np.array_split(order, num_parts)]


def _check_parts(num_samples: int, num_parts: int) -> None:
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if num_samples < num_parts:
        raise ValueError(f"cannot split {num_samples} samples into {num_parts} non-empty parts")


def iid_partition(
    num_samples: int, num_parts: int, seed: int = 0, drop_remainder: bool = True
) -> list[np.ndarray]:
    """Random equal split of ``range(num_samples)`` into ``num_parts`` disjoint shards.

    Args:
        num_samples: size ``N`` of the data set.
        num_parts: number of shards ``K`` (the world size).
        seed: seed of the ``numpy.random.RandomState`` that draws the permutation.
        drop_remainder: if True, every shard has ``N // K`` samples; otherwise sizes differ by <= 1
            and the shards cover all samples.

    Returns:
        ``K`` int64 arrays of sample indices.
    """
    _check_parts(num_samples, num_parts)
    order = np.arange(num_samples, dtype=np.int64)
    np.random.RandomState(seed).shuffle(order)
    return _cut_equal(order, num_parts, drop_remainder)


def _dirichlet_group(
    pairs: np.ndarray,
    classes: np.ndarray,
    num_workers: int,
    alpha: float,
    rng: np.random.RandomState,
    min_fraction: float,
    max_attempts: int,
) -> list[list[int]]:
    """Step 2 above for one group of workers; ``pairs`` holds (index, label) rows."""
    n_group = len(pairs)
    cap = n_group / num_workers  # a worker at or above its fair share gets no more of any class
    min_required = int(min_fraction * n_group / num_workers)
    by_class = [pairs[pairs[:, 1] == c, 0] for c in classes]
    for _attempt in range(max_attempts):
        lists: list[list[int]] = [[] for _ in range(num_workers)]
        for idx_class in by_class:
            p = rng.dirichlet(np.repeat(alpha, num_workers))
            open_workers = np.array([len(lst) < cap for lst in lists], dtype=np.float64)
            p = p * open_workers
            total = p.sum()
            # The reference divides by this sum unguarded. It can be 0 when every worker that is still
            # open drew an underflowing proportion (tiny alpha); we then spread the class uniformly over
            # the open workers instead of producing NaN cut points.
            p = p / total if total > 0 else open_workers / max(open_workers.sum(), 1.0)
            cuts = (np.cumsum(p) * len(idx_class)).astype(np.int64)[:-1]
            for lst, piece in zip(lists, np.split(idx_class, cuts), strict=True):
                lst.extend(piece.tolist())
        if min(len(lst) for lst in lists) >= min_required:
            return lists
    raise RuntimeError(
        f"Dirichlet partition: no draw in {max_attempts} attempts gave every one of {num_workers} workers "
        f">= {min_required} samples (alpha={alpha}); use a larger alpha or fewer workers"
    )


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_parts: int,
    alpha: float = 0.1,
    seed: int = 0,
    drop_remainder: bool = True,
    min_fraction: float = 0.5,
    max_attempts: int = 10_000,
) -> list[np.ndarray]:
    """Non-IID split following Lin et al. (2021) as their reference code does (steps 1-5 of the module
    docstring).

    Args:
        labels: class label of every sample (length ``N``).
        num_parts: number of shards ``K``.
        alpha: Dirichlet concentration; smaller is more skewed (the paper uses 0.1).
        seed: seed of the ``numpy.random.RandomState`` used for the shuffle and the draws.
        drop_remainder: see :func:`iid_partition`.
        min_fraction: a draw is accepted once every worker holds ``>= min_fraction * n_g / K_g``
            samples (0.5 in the reference).
        max_attempts: bound on redraws per group, so an impossible request fails instead of looping.

    Returns:
        ``K`` int64 arrays of sample indices, disjoint.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(y)
    _check_parts(n, num_parts)
    rng = np.random.RandomState(seed)

    # Step 1: shuffle (index, label) rows together, then give each group of <= 10 workers a slice.
    pairs = np.stack([np.arange(n, dtype=np.int64), y], axis=1)
    rng.shuffle(pairs)
    classes = np.unique(y)
    num_groups = -(-num_parts // _GROUP_SIZE)
    group_sizes = [_GROUP_SIZE] * (num_groups - 1) + [num_parts - _GROUP_SIZE * (num_groups - 1)]
    # Each non-final slice has int(10 / K * N) rows, the final one takes the rest (as in the reference).
    step = int(_GROUP_SIZE / num_parts * n)

    arrangement: list[int] = []
    for g, workers in enumerate(group_sizes):
        lo = g * step
        hi = n if g == num_groups - 1 else lo + step
        # Steps 2 and 3: per-class Dirichlet assignment, then concatenation in worker order.
        for lst in _dirichlet_group(pairs[lo:hi], classes, workers, alpha, rng, min_fraction, max_attempts):
            arrangement.extend(lst)

    # Step 4: equal contiguous chunks of the concatenation.
    return _cut_equal(np.asarray(arrangement, dtype=np.int64), num_parts, drop_remainder)


def partition_indices(
    labels: Sequence[int] | np.ndarray,
    num_parts: int,
    scheme: PartitionScheme = "iid",
    alpha: float = 0.1,
    seed: int = 0,
    drop_remainder: bool = True,
) -> list[np.ndarray]:
    """Dispatch to :func:`iid_partition` or :func:`dirichlet_partition` (``alpha`` is used by the latter)."""
    if scheme == "iid":
        return iid_partition(len(labels), num_parts, seed=seed, drop_remainder=drop_remainder)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_parts, alpha=alpha, seed=seed, drop_remainder=drop_remainder)
    raise ValueError(f"unknown partition scheme {scheme!r}; expected 'iid' or 'dirichlet'")


def class_histogram(
    labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Per-shard class counts: an int64 array of shape ``(K, num_classes)``."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    c = int(y.max()) + 1 if num_classes is None else num_classes
    return np.stack([np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=c) for p in parts])


def format_histogram(hist: np.ndarray, max_classes: int = 20) -> str:
    """Render a ``(K, C)`` histogram as a fixed-width table, one row per rank.

    For many classes (CIFAR-100) only the first ``max_classes`` columns are shown, followed by the
    number of classes the rank holds at all, which is the quantity that shows the skew.
    """
    k, c = hist.shape
    shown = min(c, max_classes)
    width = max(5, len(str(int(hist.max()))) + 1)
    head = "rank" + "".join(f"{j:>{width}}" for j in range(shown))
    head += ("  ..." if shown < c else "") + f"{'total':>8}{'classes':>9}"
    rows = [head]
    for r in range(k):
        row = f"{r:>4}" + "".join(f"{int(v):>{width}}" for v in hist[r, :shown])
        row += ("  ..." if shown < c else "") + f"{int(hist[r].sum()):>8}{int((hist[r] > 0).sum()):>9}"
        rows.append(row)
    return "\n".join(rows)
