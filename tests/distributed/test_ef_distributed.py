"""``method="ef"`` on 2 gloo ranks with the user's optimizer (AdamW, Adam, Nesterov SGD), against
DDPStrategy, error feedback written out by hand plus the torch optimizer, and the simulator.

Every run uses the ``two_buckets`` model with ``bucket_cap_mb=0.25`` and asserts that DDP used at
least two buckets after its rebuild.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import reference
import torch
from distributed_runner import Module
from helpers import (
    assert_close,
    assert_replicas_identical,
    assert_resumed_bitwise,
    assert_two_buckets,
    loss_fn,
    make_dataset,
    rank_batch,
    run_distributed,
    runner_problem,
)
from reference import RBGS, Identity, TopK

from lightning_gmc import Simulator

BASE = {
    "model": "two_buckets",
    "optimizer": "adamw",
    "lr": 0.01,
    "weight_decay": 0.05,
    "two_groups": True,  # per-group lr and weight decay, as the optimizer defines them
    "schedule": "cosine",
    "batch_size": 16,
}


def _residual(result: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {n[len("net.") :]: t for n, t in result["gmc_state"]["local"]["residual"].items()}


def _optimizer(cfg: dict[str, Any], model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """The runner's optimizer and per-step scheduler for ``cfg``, on ``model``'s parameters."""
    module = Module(cfg)
    module.net = model
    conf = module.configure_optimizers()
    if isinstance(conf, dict):
        return conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    return conf, None


def replay_ef(
    cfg: dict[str, Any],
    compress: reference.Compressor,
    steps: int,
    world_size: int = 2,
    zero_gradient: tuple[int, int] | None = None,
    ef21: bool = False,
) -> dict[str, Any]:
    """Error feedback written out by hand (:func:`reference.ef`, ``docs/algorithms.md`` 2.10) with the
    runner's torch optimizer stepping on the mean of the compressed vectors; ``ef21``: EF21 instead
    (:func:`reference.ef21`, 2.11), the optimizer stepping on the aggregate ``h``, and ``residual``
    holds the estimates ``h_k``.

    ``zero_gradient``: ``(step, rank)`` whose gradient counts as zero (a skipped non-finite bucket).
    """
    problem = runner_problem(cfg, world_size)
    model = Module(cfg).net
    optimizer, scheduler = _optimizer(cfg, model)

    def optimizer_step(direction: torch.Tensor, step: int) -> torch.Tensor:
        for p, grad in zip(model.parameters(), problem.split(direction).values(), strict=True):
            p.grad = grad.clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    rule = reference.ef21 if ef21 else reference.ef
    run = rule(problem, steps, compress, optimizer_step, zero_gradient)
    return {
        "params": problem.split(run.w),
        "residual": [problem.split(e) for e in run.residual],
        "aggregate": problem.split(run.momentum) if ef21 else None,
    }


def _simulate(
    cfg: dict[str, Any], steps: int, zero_gradient: tuple[int, int] | None = None
) -> tuple[dict[str, torch.Tensor], Simulator]:
    """The simulator's aggregated gradient, handed to the runner's optimizer by the caller."""
    torch.set_num_threads(1)
    model = Module(cfg).net
    optimizer, scheduler = _optimizer(cfg, model)
    data = make_dataset(cfg.get("num_samples", 256), cfg.get("data_seed", 1))
    kwargs = cfg["strategy_kwargs"]
    sim = Simulator(
        dict(model.named_parameters()),
        num_workers=2,
        method="ef",
        compressor=kwargs["compressor"],
        density=kwargs["density"],
        seed=kwargs.get("seed", 0),
    )
    acc = cfg.get("accumulate_grad_batches", 1)
    for step in range(steps):
        lr = optimizer.param_groups[0]["lr"]
        points = sim.gradient_points(dict(model.named_parameters()), lr)
        grads = []
        for rank in range(2):
            model.zero_grad()
            for micro in range(acc):
                x, y = rank_batch(data, rank, 2, cfg["batch_size"], step * acc + micro)
                (loss_fn(model, x, y) / acc).backward()
            skipped = zero_gradient == (step, rank)
            grads.append(
                {n: torch.zeros_like(p) if skipped else p.grad.clone() for n, p in model.named_parameters()}
            )
        direction = sim.step(grads, points, lr)[0]
        for name, p in model.named_parameters():
            p.grad = direction[name]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, sim


def _assert_optimizer_state_close(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for index, state in expected["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(actual["state"][index][key], value, rtol=0, atol=1e-6)


def test_identity_compressor_with_adamw_equals_ddp_strategy(tmp_path: Path) -> None:
    steps = 20
    cfg = {**BASE, "total_steps": steps, "max_steps": steps}
    ef = run_distributed(tmp_path, {**cfg, "strategy_kwargs": {"method": "ef", "compressor": "none"}})
    ddp = run_distributed(tmp_path, {**cfg, "strategy": "ddp"})
    assert_two_buckets(ef, steps)
    assert_replicas_identical(ef)
    for name, expected in ddp[0]["params"].items():
        torch.testing.assert_close(ef[0]["params"][name], expected, rtol=0, atol=1e-6)
    # AdamW kept its own hyper-parameters (decoupled decay per group) and state, as under DDP
    assert ef[0]["optimizer_groups"] == [
        {k: v for k, v in g.items() if k != "params"} for g in ddp[0]["optimizer_state"]["param_groups"]
    ]
    assert ef[0]["optimizer_groups"][0]["weight_decay"] == 2 * cfg["weight_decay"]
    _assert_optimizer_state_close(ef[0]["optimizer_state"], ddp[0]["optimizer_state"])
    metrics = ef[0]["metrics"][-1]
    assert metrics["gmc/rcc"] == pytest.approx(1.0)
    assert metrics["gmc/residual_norm"] == 0.0  # the identity leaves nothing behind
    # The in-process stand-in for DDP the next test uses: the mean gradient + the torch optimizer.
    dense = replay_ef(cfg, Identity(), steps)
    assert_close(ddp[0]["params"], dense["params"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"optimizer": "adam"},
        {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    ],
    ids=["adam", "sgd-nesterov"],
)
def test_identity_compressor_equals_dense_training_with_the_users_optimizer(
    tmp_path: Path, optimizer: dict[str, Any]
) -> None:
    # DDP + optimizer, replayed in-process (checked against DDPStrategy itself in the AdamW test above,
    # which saves two process launches per optimizer here).
    steps = 20
    cfg = {**BASE, **optimizer, "total_steps": steps, "max_steps": steps}
    ef = run_distributed(tmp_path, {**cfg, "strategy_kwargs": {"method": "ef", "compressor": "none"}})
    assert_two_buckets(ef, steps)
    assert_replicas_identical(ef)
    dense = replay_ef(cfg, Identity(), steps)
    assert_close(ef[0]["params"], dense["params"], rtol=0, atol=1e-6)
    if optimizer["optimizer"] == "sgd":  # the takeover would have refused Nesterov; ef keeps it
        assert ef[0]["optimizer_groups"][1]["nesterov"] is True
        assert ef[0]["optimizer_groups"][1]["momentum"] == 0.9


def test_topk_with_adamw_equals_ef_by_hand_and_the_simulator_across_a_nonfinite_step(
    tmp_path: Path,
) -> None:
    steps = 8
    density = 0.02
    cfg = {
        **BASE,
        "total_steps": steps,
        "max_steps": steps,
        "strategy_kwargs": {"method": "ef", "compressor": "topk", "density": density},
    }
    # rank 0's gradient is NaN at step 2: the default policy sends zero for it that step
    results = run_distributed(tmp_path, {**cfg, "nan_at_step": 2, "nan_rank": 0})
    assert_two_buckets(results, steps)
    assert_replicas_identical(results)
    skips = [m["gmc/nonfinite_skips"] for m in results[0]["metrics"] if "gmc/nonfinite_skips" in m]
    assert skips == [0, 0] + [len(results[0]["bucket_numels"])] * (steps - 2)
    by_hand = replay_ef(cfg, TopK(density), steps, zero_gradient=(2, 0))
    assert_close(results[0]["params"], by_hand["params"])
    for rank in range(2):
        assert_close(_residual(results[rank]), by_hand["residual"][rank])
    simulated, sim = _simulate(cfg, steps, zero_gradient=(2, 0))
    assert_close(results[0]["params"], simulated)
    for rank in range(2):
        expected = {n: t.view_as(by_hand["residual"][rank][n]) for n, t in sim.residual(rank).items()}
        assert_close(_residual(results[rank]), expected)
    # top-k's wire bytes: k (fp32 value, int32 index) pairs per parameter by all-gather, on 2 ranks
    k_total = sum(max(1, math.floor(density * t.numel() + 1e-9)) for t in simulated.values())
    for record in results[0]["metrics"]:
        if "gmc/bytes_sent" in record:
            assert record["gmc/bytes_sent"] == 8 * k_total


def test_resume_with_rbgs_and_adamw_is_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    steps = 8
    cfg = {
        **BASE,
        "strategy_kwargs": {"method": "ef", "compressor": "rbgs", "density": 0.05, "seed": 3},
        "total_steps": steps,
        "num_samples": 128,  # 4 batches per rank and epoch
        "max_steps": -1,
    }
    straight = run_distributed(tmp_path, {**cfg, "max_epochs": 2})
    ckpt = str(tmp_path / "half.ckpt")
    first = run_distributed(tmp_path, {**cfg, "max_epochs": 1, "save_checkpoint": ckpt})
    resumed = run_distributed(tmp_path, {**cfg, "max_epochs": 2, "resume_from": ckpt})
    assert_two_buckets(straight, steps)
    assert first[0]["gmc_step"] == steps // 2 and resumed[0]["gmc_step"] == steps
    assert_resumed_bitwise(straight, resumed)
    for rank in range(2):
        # AdamW's moments came back through Lightning's optimizer state
        for index, state in straight[rank]["optimizer_state"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(resumed[rank]["optimizer_state"]["state"][index][key], state[key])
    assert not torch.equal(
        straight[0]["gmc_state"]["local"]["residual"]["net.0.weight"],
        straight[1]["gmc_state"]["local"]["residual"]["net.0.weight"],
    )
    # ... and the run is error feedback with RBGS's shared blocks, written out by hand
    by_hand = replay_ef({**cfg, "strategy_kwargs": cfg["strategy_kwargs"]}, RBGS(0.05, seed=3), steps)
    assert_close(straight[0]["params"], by_hand["params"])


def test_gradient_accumulation_compresses_once_per_optimizer_step(tmp_path: Path) -> None:
    steps = 4
    cfg = {
        **BASE,
        "strategy_kwargs": {"method": "ef", "compressor": "topk", "density": 0.05},
        "accumulate_grad_batches": 2,
        "total_steps": steps,
        "max_steps": steps,
    }
    results = run_distributed(tmp_path, cfg)
    assert_two_buckets(results, steps)
    assert_replicas_identical(results)
    by_hand = replay_ef(cfg, TopK(0.05), steps)
    assert_close(results[0]["params"], by_hand["params"])
    for rank in range(2):
        assert_close(_residual(results[rank]), by_hand["residual"][rank])


def test_ef21_with_topk_and_adamw_equals_the_rule_by_hand(tmp_path: Path) -> None:
    steps = 6
    cfg = {
        **BASE,
        "total_steps": steps,
        "max_steps": steps,
        "strategy_kwargs": {"method": "ef21", "compressor": "topk", "density": 0.02},
    }
    results = run_distributed(tmp_path, cfg)
    assert_two_buckets(results, steps)
    assert_replicas_identical(results)
    by_hand = replay_ef(cfg, TopK(0.02), steps, ef21=True)
    assert_close(results[0]["params"], by_hand["params"])
    for rank in range(2):
        estimate = {n[len("net.") :]: t for n, t in results[rank]["gmc_state"]["local"]["estimate"].items()}
        assert_close(estimate, by_hand["residual"][rank])
        aggregate = {
            n[len("net.") :]: t for n, t in results[rank]["gmc_state"]["shared"]["aggregate"].items()
        }
        assert_close(aggregate, by_hand["aggregate"])
