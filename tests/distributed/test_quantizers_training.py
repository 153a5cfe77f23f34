"""Every bit-budget compressor trains a tiny model with GMC on 2 gloo ranks.

One launch (``helpers.run_distributed_cases``) runs every compressor's case in turn: Lightning starts 2
CPU ranks on gloo, each case takes three optimizer steps with a new Trainer, and each rank reports its
parameters and logged metrics. The payloads of these compressors depend on the sender, so they travel
by the all-gather route and every rank decodes every payload: the replicas must stay bit-identical.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import make_model, run_distributed_cases

CASES: list[tuple[str, dict[str, Any]]] = [
    ("qsgd", {"compressor_options": {"levels": 4}}),
    ("natural", {}),
    ("natural_dithering", {"compressor_options": {"levels": 4}}),
    ("terngrad", {}),
    ("scaled_sign", {}),
    ("sd_l1", {"density": 0.3}),
    ("spherical_rc", {"compressor_options": {"block_size": 8, "bits_per_block": 6}}),
]


def _config(name: str, extra: dict[str, Any]) -> dict[str, Any]:
    strategy = {"compressor": name, "density": extra.get("density", 0.1)}
    if "compressor_options" in extra:
        strategy["compressor_options"] = extra["compressor_options"]
    return {
        "model": "small",
        "lr": 0.05,
        "momentum": 0.9,
        "batch_size": 16,
        "max_steps": 3,
        "strategy_kwargs": strategy,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every case's 2-rank run, all in one launch."""
    cases = {name: _config(name, extra) for name, extra in CASES}
    return run_distributed_cases(tmp_path_factory.mktemp("quantizers"), cases)


@pytest.mark.parametrize(("name", "extra"), CASES, ids=[c[0] for c in CASES])
def test_compressor_trains_with_gmc_on_two_ranks(
    runs: dict[str, list[dict[str, Any]]], name: str, extra: dict[str, Any]
) -> None:
    results = runs[name]
    assert results[0]["gmc_state"]["method"].startswith(f"gmc with {name},")  # this case's own run
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
