"""GMCFabricStrategy on 2 gloo ranks: a plain Fabric loop against GMC+ written out by hand, and a resume
from ``fabric.save`` equal to the uninterrupted run (in one process: ``tests/strategy/test_fabric.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FABRIC_RUNNER, assert_close, replay_gmc, run_distributed
from reference import TopK

CFG: dict[str, Any] = {
    "model": "small",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-3,
    "batch_size": 16,
    "steps": 6,
    "strategy_kwargs": {"compressor": "topk", "density": 0.05, "detach": 0.5},
}


def test_fabric_loop_is_gmc_plus_and_resumes_from_fabric_save(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "fabric.ckpt")
    full = run_distributed(tmp_path, {**CFG, "save_at": 3, "save_path": ckpt}, runner=FABRIC_RUNNER)
    # the hook ran with the optimizer taken over and the gradient at the detached point
    by_hand = replay_gmc(CFG, [CFG["lr"]] * CFG["steps"], TopK(0.05))
    for r in full:
        assert r["gmc_step"] == CFG["steps"]
        assert (r["optimizer_groups"][0]["momentum"], r["optimizer_groups"][0]["weight_decay"]) == (0.0, 0.0)
        assert_close(r["params"], by_hand["params"])
        residual = r["gmc_state"]["local"]["residual"]
        assert_close(residual, by_hand["residual"][r["rank"]])
    # fabric.save carried every rank's residual, the momentum and the step: the resumed run is the same
    resumed = run_distributed(tmp_path, {**CFG, "resume_from": ckpt}, runner=FABRIC_RUNNER)
    for before, after in zip(full, resumed, strict=True):
        assert after["gmc_step"] == CFG["steps"]
        for name, tensor in before["params"].items():
            assert torch.equal(after["params"][name], tensor), name
    # metrics: this rank's traffic and the sum over ranks, named so
    totals = [r["gmc_state"]["stats"]["bytes_sent_total"] for r in full]
    metrics = full[0]["metrics"]
    assert metrics["gmc/bytes_sent_total"] == pytest.approx(totals[0])
    assert metrics["gmc/bytes_sent_total_sum_ranks"] == pytest.approx(sum(totals))
    assert metrics["gmc/nonfinite_skips"] == 0
