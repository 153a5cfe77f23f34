"""Every bit-budget compressor trains a tiny model with GMC on 2 gloo ranks.

Uses the shared launcher (``helpers.run_distributed``): Lightning starts 2 CPU ranks on gloo, three
optimizer steps are taken, and each rank reports its parameters and logged metrics. The payloads of
these compressors depend on the sender, so they travel by the all-gather route and every rank
decodes every payload: the replicas must stay bit-identical.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_model, run_distributed

CASES: list[tuple[str, dict[str, Any]]] = [
    ("qsgd", {"compressor_options": {"levels": 4}}),
    ("natural", {}),
    ("natural_dithering", {"compressor_options": {"levels": 4}}),
    ("terngrad", {}),
    ("scaled_sign", {}),
    ("sd_l1", {"density": 0.3}),
    ("spherical_rc", {"compressor_options": {"block_size": 8, "bits_per_block": 6}}),
]


@pytest.mark.parametrize(("name", "extra"), CASES, ids=[c[0] for c in CASES])
def test_compressor_trains_with_gmc_on_two_ranks(tmp_path: Path, name: str, extra: dict[str, Any]) -> None:
    strategy = {"compressor": name, "density": extra.get("density", 0.1)}
    if "compressor_options" in extra:
        strategy["compressor_options"] = extra["compressor_options"]
    config = {
        "model": "small",
        "lr": 0.05,
        "momentum": 0.9,
        "batch_size": 16,
        "max_steps": 3,
        "strategy_kwargs": strategy,
    }
    results = run_distributed(tmp_path, config)
    initial = dict(make_model("small").named_parameters())
    moved = False
    for key, tensor in results[0]["params"].items():
        assert torch.isfinite(tensor).all(), key
        assert torch.equal(tensor, results[1]["params"][key]), key  # replicas identical
        moved = moved or not torch.equal(tensor, initial[key].detach())
    assert moved, "no parameter changed"
    assert results[0]["global_step"] == 3
    losses = [r["train_loss"] for r in results[0]["metrics"] if "train_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
