"""Every baseline method on 2 gloo ranks (CPU): equals the simulator, resumes exactly, evaluates the
right model, and logs the paper's RCC.

One interrupted run per method: ``STEPS // 2`` steps and a checkpoint, then a resume to ``STEPS`` in
new processes (two launches in all: the first halves of every case, one after another, then every
resume).
Both halves are compared with one uninterrupted replay in the simulator (same initial model, same
per-rank batches, same learning rates), so a resume that lost any state (local momentum, residuals,
CSER's per-rank models, DGC's warm-up position, traffic totals) shows up as a mismatch after it.

Each rank's data is a single batch per epoch (32 samples, batch 16), so every step is an epoch: DGC's
per-epoch warm-up changes density every step, validation runs after every step (on the method's
evaluation model), and resuming at an epoch boundary replays the data exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_close,
    loss_fn,
    lr_at,
    make_dataset,
    make_model,
    rank_batch,
    replay_sgd,
    run_distributed_cases,
)

from lightning_gmc import Simulator

STEPS = 6
BASE = {
    "model": "small",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-3,
    "batch_size": 16,
    "num_samples": 32,
    "schedule": "cosine",
    "total_steps": STEPS,
    "limit_val_batches": 1,
}

CASES: dict[str, dict[str, Any]] = {
    "dmsgd": {"method": "dmsgd"},
    "dgc": {
        "method": "dgc",
        "compressor": "topk",
        "density": 0.05,
        # warm-up spans the resume point (epoch 3); clipping scales the threshold by K^-1/2
        "method_options": {
            "momentum_masking": True,
            "sparsity_warmup": [0.5, 0.25, 0.1, 0.08],
            "clip_norm": 0.5,
        },
        # No validation: resuming a checkpoint written by trainer.save_checkpoint() after a fit that
        # validated at its last epoch end makes Lightning count the next epoch one too far (seen with
        # lightning 2.x: the resumed run reports epochs 4, 5, 6 instead of 3, 4, 5), which shifts every
        # per-epoch schedule, DGC's warm-up included. DGC evaluates w_t, so validation adds nothing here.
        "run": {"limit_val_batches": 0},
    },
    "cser": {
        "method": "cser",
        "compressor": "topk",
        "density": 0.05,
        "seed": 5,
        # C1 by all-gather, C2 (RBGS) by all-reduce; resets after steps 2, 4 and 6, so the
        # checkpoint (after step 3) holds un-synchronised per-rank models
        "method_options": {"reset_compressor": "rbgs", "reset_density": 0.2, "reset_interval": 2},
    },
    "def_a": {"method": "def_a", "compressor": "rbgs", "density": 0.05, "detach": 0.3, "seed": 3},
    "ef_server_momentum": {"method": "ef_server_momentum", "compressor": "topk", "density": 0.05},
    # "GMC+ with momentum on the aggregate": the hook's detached point on a gradient-unit residual
    "ef_server_momentum_detached": {
        "method": "ef_server_momentum",
        "compressor": "rbgs",
        "density": 0.05,
        "detach": 0.5,
        "seed": 4,
    },
    "gmc_lr_inside": {"method": "gmc_lr_inside", "compressor": "topk", "density": 0.05},
}


def _replay(strategy: dict[str, Any]) -> dict[str, list[Any]]:
    """The run, step by step, in the simulator: per-rank parameters, evaluation model, validation
    loss and cumulative RCC after every step."""
    torch.set_num_threads(1)  # the runner's ranks use one thread: same matmul rounding
    model = make_model(BASE["model"], 0)
    data = make_dataset(BASE["num_samples"], 1)
    options = dict(strategy.get("method_options", {}))
    if "detach" in strategy:
        options["detach"] = strategy["detach"]
    sim = Simulator(
        dict(model.named_parameters()),
        num_workers=2,
        method=strategy["method"],
        compressor=strategy.get("compressor"),
        density=strategy.get("density", 0.01),
        momentum=BASE["momentum"],
        weight_decay=BASE["weight_decay"],
        seed=strategy.get("seed", 0),
        wire_dtype=strategy.get("wire_dtype", "fp32"),
        **options,
    )
    names = [name for name, _ in model.named_parameters()]
    xs = [{name: p.detach().clone() for name, p in model.named_parameters()} for _ in range(2)]
    per_rank_models = sim.method.evaluation_point == "mean_params"

    def loss_at(params: dict[str, torch.Tensor], rank: int, step: int) -> torch.Tensor:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        x, y = rank_batch(data, rank, 2, BASE["batch_size"], step)
        return loss_fn(model, x, y)

    history: dict[str, list[Any]] = {"params": [], "evaluation": [], "val_loss": [], "rcc": []}
    for step in range(STEPS):
        lr = lr_at(step, BASE["lr"], BASE["schedule"], STEPS)
        sim.method.on_epoch_start(step)  # one batch per epoch
        points = [dict(x) for x in xs] if per_rank_models else sim.gradient_points(xs[0], lr)
        grads = []
        for rank in range(2):
            model.zero_grad()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(points[rank][name])
            x, y = rank_batch(data, rank, 2, BASE["batch_size"], step)
            loss_fn(model, x, y).backward()
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        directions = sim.step(grads, points, lr)
        for rank in range(2):
            # w - lr d as torch.optim.SGD computes it (one fused add), so a run can match bit for bit
            xs[rank] = {name: xs[rank][name].add(directions[rank][name], alpha=-lr) for name in names}
        if sim.method.evaluation_point == "mean_params":
            evaluation = {name: (xs[0][name] + xs[1][name]) / 2 for name in names}
        elif sim.method.evaluation_point == "params_minus_mean_residual":
            residuals = [sim.residual(rank) for rank in range(2)]
            evaluation = {name: xs[0][name] - (residuals[0][name] + residuals[1][name]) / 2 for name in names}
        else:
            evaluation = dict(xs[0])
        history["params"].append([dict(x) for x in xs])
        history["evaluation"].append(evaluation)
        # validation after the step: the evaluation model (identical on both ranks) on the first
        # validation batch, which the runner's validation loader gives every rank
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(evaluation[name])
            x, y = data[0][: BASE["batch_size"]], data[1][: BASE["batch_size"]]
            history["val_loss"].append(float(loss_fn(model, x, y)))
        history["rcc"].append(sim.stats.take_step()["rcc"])
    return history


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def config(strategy: dict[str, Any], run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The runner config of a case: ``BASE``, the case's ``run`` keys, its strategy arguments."""
    return {**BASE, **(run or {}), "strategy_kwargs": {**strategy, "bucket_cap_mb": 0.25}}


def run_interrupted(
    tmp_path: Path, interrupted: dict[str, dict[str, Any]], straight: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Each config of ``interrupted`` trained to ``STEPS // 2`` with a checkpoint, then resumed to
    ``STEPS`` by new processes; each of ``straight`` trained to ``STEPS`` at once. Two launches in
    all, each running its cases one after another. Returns per case ``first`` (a straight case's
    whole run), ``resumed`` and ``checkpoint`` (None for a straight case)."""
    checkpoints = {case: tmp_path / f"{case}.ckpt" for case in interrupted}
    halves = {
        case: {**cfg, "max_steps": STEPS // 2, "save_checkpoint": str(checkpoints[case])}
        for case, cfg in interrupted.items()
    }
    wholes = {case: {**cfg, "max_steps": STEPS} for case, cfg in (straight or {}).items()}
    first = run_distributed_cases(tmp_path, {**halves, **wholes})
    resumes = {
        case: {**cfg, "max_steps": STEPS, "resume_from": str(checkpoints[case])}
        for case, cfg in interrupted.items()
    }
    resumed = run_distributed_cases(tmp_path, resumes)
    return {
        case: {"first": first[case], "resumed": resumed.get(case), "checkpoint": checkpoints.get(case)}
        for case in first
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    configs = {
        case: config({k: v for k, v in options.items() if k != "run"}, options.get("run"))
        for case, options in CASES.items()
    }
    return run_interrupted(tmp_path_factory.mktemp("methods"), configs)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_the_simulator_and_resume_exactly(runs: dict[str, dict[str, Any]], case: str) -> None:
    strategy = {key: value for key, value in CASES[case].items() if key != "run"}
    cfg = config(strategy, CASES[case].get("run"))
    first, resumed, ckpt = runs[case]["first"], runs[case]["resumed"], runs[case]["checkpoint"]
    for result in (first, resumed):  # this case's own runs, out of the launches of every case
        assert result[0]["gmc_state"]["method"].startswith(f"{strategy['method']} ")
    expected = _replay(strategy)

    assert [lr_at(t, BASE["lr"], "cosine", STEPS) for t in range(STEPS)] == pytest.approx(
        first[0]["lrs"] + resumed[0]["lrs"]
    )
    # every rank's training parameters, before and after the resume
    for result, step in ((first, STEPS // 2), (resumed, STEPS)):
        for rank in range(2):
            assert result[rank]["gmc_step"] == step
            for name, tensor in expected["params"][step - 1][rank].items():
                _close(result[rank]["params"][name], tensor)

    # the checkpoint's weights are the evaluation model (CSER: the average; DEF-A: x - mean e)
    checkpoint = torch.load(ckpt, weights_only=False)
    for name, tensor in expected["evaluation"][STEPS // 2 - 1].items():
        _close(checkpoint["state_dict"][f"net.{name}"], tensor)

    # validation after every step ran on the evaluation model, then training went on from each
    # rank's own model (checked above)
    logged = [m["val_loss"] for r in (first, resumed) for m in r[0]["metrics"] if "val_loss" in m]
    if cfg["limit_val_batches"]:
        assert logged == pytest.approx(expected["val_loss"], rel=1e-5)

    # RCC: cumulative over the run, across the resume, the paper's eq. (9) (docs/algorithms.md 3.8)
    rcc = [m["gmc/rcc"] for r in (first, resumed) for m in r[0]["metrics"] if "gmc/rcc" in m]
    assert rcc == pytest.approx(expected["rcc"], rel=1e-6)
    if case == "dmsgd":
        assert rcc[-1] == pytest.approx(1.0)
        # independent reference: dense DMSGD is plain DDP with torch.optim.SGD(momentum, weight_decay)
        lrs = [lr_at(t, BASE["lr"], "cosine", STEPS) for t in range(STEPS)]
        for result, step in ((first, STEPS // 2), (resumed, STEPS)):
            assert_close(result[0]["params"], replay_sgd(BASE, lrs[:step]))
    else:
        assert rcc[-1] < 0.6
