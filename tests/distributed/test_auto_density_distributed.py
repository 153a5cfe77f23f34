"""density="auto" on 2 gloo ranks (plain DDP + the hook, one launch for every case): ranks agree on rank
0's decision, a forced change of density keeps replicas identical and equals the simulator switching
at the same steps, and a resumed run continues the decisions and the training bit for bit."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch
from helpers import loss_fn, make_dataset, make_model, rank_batch
from launch import TESTS, launch_ranks

from lightning_gmc import Simulator
from lightning_gmc.compressors import Identity

SCRIPT = TESTS / "auto_density_script.py"
WORLD = 2
# (step s, latency s, link bit/s) at 1 Mbit/s and 100 Gbit/s; a 0.5 ms step, so that the hook's own
# cost is visible against the compute of the small model
SLOW, FAST = [5e-4, 1e-4, 1e6], [5e-4, 1e-4, 1e11]
# the dense route's step measured at 1 Mbit/s: ten times the compressed one
DENSE_ON_SLOW = [5e-3, 1e-4, 1e6]
AUTO = {"warmup_steps": 4, "trial_steps": 4, "interval": 4}
PINS = {"3": 0.2, "6": "none", "9": 0.02}
CFG: dict[str, Any] = {
    "lr": 0.1,
    "steps": 12,
    "batch_size": 8,
    "num_samples": 64,
    "cases": {
        "measured": {"config": {"compressor": "topk", "density": "auto", "auto_density": AUTO}},
        "rank_dependent": {
            "config": {"compressor": "topk", "density": "auto", "auto_density": AUTO},
            "per_rank": [SLOW, FAST],
        },
        "forced": {
            "config": {
                "compressor": "topk",
                "density": "auto",
                "auto_density": {"pin": 0.05, "warmup_steps": 100},
            },
            "pins": PINS,
        },
        "resumed": {
            "config": {
                "compressor": "rbgs",
                "density": "auto",
                "detach": 0.5,
                "auto_density": {**AUTO, "hysteresis": 0.0},
            },
            "measurements": [SLOW, FAST, DENSE_ON_SLOW],
            "checkpoint_at": 6,
        },
    },
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("auto_density")
    (out_dir / "config.json").write_text(json.dumps({**CFG, "out_dir": str(out_dir)}))
    launch_ranks([SCRIPT, out_dir / "config.json"], WORLD, timeout=240)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _bits(params: dict[str, torch.Tensor]) -> list[bytes]:
    return [t.numpy().tobytes() for t in params.values()]


def _assert_replicas_identical(results: list[dict[str, Any]], case: str) -> None:
    for step, entry in enumerate(results[0][case]["run"]):
        other = results[1][case]["run"][step]
        assert _bits(entry["params"]) == _bits(other["params"]), f"{case}: replicas differ at step {step}"
        assert entry["auto"] == other["auto"] and entry["compressor"] == other["compressor"], (case, step)


def test_measured_decisions_agree_on_every_rank(results: list[dict[str, Any]]) -> None:
    _assert_replicas_identical(results, "measured")
    history = results[0]["measured"]["run"][-1]["auto"]["history"]
    assert [d["step"] for d in history] == [4, 8, 12]  # the last one after the last step
    for decision in history:
        assert 0 < decision["link_bps"] < float("inf") and decision["latency_s"] > 0
        assert decision["measured_step_s"] > 0
    metrics = results[0]["measured"]["run"][-1]["metrics"]
    assert metrics["auto_link_bps"] == history[-1]["link_bps"]


def test_rank_zero_decides_for_every_rank(results: list[dict[str, Any]]) -> None:
    # Rank 0 measured 1 Mbit/s (compress), rank 1 100 Gbit/s (dense): every rank follows rank 0.
    _assert_replicas_identical(results, "rank_dependent")
    for result in results:
        history = result["rank_dependent"]["run"][-1]["auto"]["history"]
        assert [d["link_bps"] for d in history] == [1e6, 1e6, 1e6]
        assert all(d["density"] is not None for d in history), history


def _replay_forced(steps: int) -> list[dict[str, torch.Tensor]]:
    """The forced schedule in the K = 2 simulator: the method's compressor replaced before the same
    steps, gradients of each rank's batch at the common parameters."""
    torch.set_num_threads(1)
    model = make_model("small", 0)
    data = make_dataset(CFG["num_samples"], 1)
    sim = Simulator(
        dict(model.named_parameters()),
        WORLD,
        compressor="topk",
        density=0.05,
        momentum=0.9,
        weight_decay=1e-3,
    )
    template = sim.method.compressor
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    out = []
    for step in range(steps):
        if str(step) in PINS:
            pin = PINS[str(step)]
            sim.method.compressor = (
                Identity() if pin == "none" else dataclasses.replace(template, density=pin)
            )
        points = sim.gradient_points(w, lr=CFG["lr"])
        grads = []
        for rank in range(WORLD):
            model.zero_grad()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(points[rank][name])
            x, y = rank_batch(data, rank, WORLD, CFG["batch_size"], step)
            loss_fn(model, x, y).backward()
            grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
        direction = sim.step(grads, points, CFG["lr"])[0]
        w = {name: w[name].clone().add_(direction[name], alpha=-CFG["lr"]) for name in w}
        out.append(w)
    return out


def test_forced_density_changes_keep_replicas_identical_and_equal_the_simulator(
    results: list[dict[str, Any]],
) -> None:
    _assert_replicas_identical(results, "forced")
    run = results[0]["forced"]["run"]
    densities = [entry["metrics"]["auto_density"] for entry in run]
    assert densities == [0.05] * 3 + [0.2] * 3 + [1.0] * 3 + [0.02] * 3
    assert [entry["compressor"] for entry in run][6] == "Identity(wire_dtype='fp32')"
    for step, (got, want) in enumerate(zip(run, _replay_forced(CFG["steps"]), strict=True)):
        assert _bits(got["params"]) == _bits(want), f"step {step}"


def test_resume_restores_the_decisions_and_continues_bitwise(results: list[dict[str, Any]]) -> None:
    _assert_replicas_identical(results, "resumed")
    run = results[0]["resumed"]["run"]
    densities = [entry["metrics"]["auto_density"] for entry in run]
    # start at min_density 1 %; the decision after step 4 (1 Mbit/s) keeps compressing, the one after
    # step 8 (100 Gbit/s) tries the dense route, the one after step 12 measures it ten times slower
    # and compresses again (metrics follow the decision)
    assert densities == [0.01] * 7 + [1.0] * 4 + [0.01], densities
    for result in results:
        straight, resumed = result["resumed"]["run"], result["resumed"]["resumed"]
        tail = straight[CFG["cases"]["resumed"]["checkpoint_at"] :]
        assert len(resumed) == len(tail)
        for got, want in zip(resumed, tail, strict=True):
            assert _bits(got["params"]) == _bits(want["params"])
            assert got["auto"] == want["auto"]  # the decision, its history and the next decision step
            assert got["compressor"] == want["compressor"]
