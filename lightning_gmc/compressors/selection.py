"""Index-selection helpers of the sparsifiers (pure tensor functions, no compressor state)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mask_nonzero", "random_subset"]

# Below this many elements a plain nonzero is as fast as the word-wise scan.
_WORDWISE_NONZERO_MIN = 1 << 16


def mask_nonzero(flags: Tensor, mask: Tensor) -> Tensor:
    """``torch.nonzero(flags).squeeze(1)`` (ascending int64 positions) for ``flags = mask[:n]``.

    On CPU a large, sparse mask is scanned as 64-bit words first, then only the non-zero words are
    expanded: the same indices in the same order, about half the time of one ``nonzero`` over every
    byte. ``mask`` is the word-aligned workspace ``flags`` starts at; its padding is cleared here.
    """
    n = flags.numel()
    if flags.device.type != "cpu" or n < _WORDWISE_NONZERO_MIN:
        return torch.nonzero(flags).squeeze(1)
    padded = -(-n // 8) * 8
    mask[n:padded] = False
    words = mask[:padded].view(torch.int64)
    hit_words = torch.nonzero(words).squeeze(1)
    row_col = torch.nonzero(mask[:padded].view(-1, 8).index_select(0, hit_words))
    return hit_words.index_select(0, row_col[:, 0]).mul_(8).add_(row_col[:, 1])


def random_subset(n: int, k: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``range(n)``, in O(k log k) when ``k << n``.

    Draws with replacement and keeps the first ``k`` distinct values in draw order, which is exactly
    sampling without replacement; ``randperm(n)`` would cost O(n) time and 8 bytes per element per
    step. Dense requests fall back to ``randperm``.
    """
    if 4 * k > n:
        return torch.randperm(n, generator=gen, device=device)[:k]
    draws = k + 2 * math.isqrt(k) + 16
    while True:
        sample = torch.randint(n, (draws,), generator=gen, device=device)
        unique, inverse = torch.unique(sample, return_inverse=True)
        if unique.numel() >= k:
            break
        draws *= 2
    first_draw = torch.full((unique.numel(),), draws, dtype=torch.int64, device=device)
    first_draw.scatter_reduce_(0, inverse, torch.arange(draws, device=device), reduce="amin")
    return unique.index_select(0, first_draw.argsort()[:k])
