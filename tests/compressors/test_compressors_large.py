"""Sparsifiers on parameters large enough for their fast paths (word-wise mask scan past 65,536
elements, sampled thresholds), against their definitions: ``topk_approx`` selects exactly the k
largest magnitudes of each parameter (candidates above a sampled threshold, then the k largest of
them, or exact top-k when too few pass), so its support equals exact top-k's."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gmc.compressors import RandomStreams, build_compressor, segments_from_numels

# The longer parameter first: the second one reuses the mask workspace with stale bytes past its end.
NUMELS = [131_077, 70_003, 300]


@pytest.mark.parametrize("step", [0, 1, 2])
def test_topk_approx_on_large_parameters_selects_exactly_the_top_k(step: int) -> None:
    x = torch.randn(sum(NUMELS), generator=torch.Generator().manual_seed(10 + step))
    compressor = build_compressor("topk_approx", density=0.01)
    plan = compressor.plan(segments_from_numels(NUMELS))
    payload = compressor.compress(x, plan, RandomStreams(seed=3, rank=step), step)
    indices = payload.tensors["indices"].long()
    offset = 0
    selected = set(indices.tolist())
    for n in NUMELS:
        k = max(1, math.floor(0.01 * n + 1e-9))
        top = torch.topk(x[offset : offset + n].abs(), k).indices + offset
        assert set(top.tolist()) <= selected, n
        offset += n
    assert len(selected) == indices.numel() == plan.total
    torch.testing.assert_close(payload.tensors["values"], x[indices], rtol=0, atol=0)
    decoded = torch.zeros_like(x)
    compressor.decompress_add(payload, plan, decoded)
    residual = x.clone()
    compressor.subtract_own(residual, payload, plan, torch.empty_like(x))
    assert torch.equal(residual + decoded, x)
