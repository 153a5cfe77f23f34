"""Shared pieces of the multi-process tests: deterministic models, data, LR schedule, a launcher, and
replays of a run by the hand-written rules of ``tests/reference.py``.

A distributed test writes a JSON config, runs ``tests/distributed_runner.py`` in a subprocess (which
starts Lightning with ``devices=2`` on gloo, the way a user script would), and reads back each rank's
results. The same model/data/schedule functions let a test rebuild the run in-process to compare it
with an independent reference (``torch.optim.SGD``, the simulator, a hand-written formula).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import reference
import torch
from launch import TESTS, launch_nodes
from torch import nn

RUNNER = TESTS / "distributed_runner.py"
FABRIC_RUNNER = TESTS / "fabric_runner.py"

NUM_FEATURES = 24
NUM_CLASSES = 6


def make_model(name: str = "small", seed: int = 0) -> nn.Module:
    """Deterministic test models.

    ``small``: a 2-layer MLP (one DDP bucket). ``two_buckets``: an MLP of ~280k parameters, a bit more
    than DDP's 1 MiB first-bucket cap, so that with ``bucket_cap_mb=0.25`` the rebuilt layout has at
    least two buckets (the tests assert how many they saw).
    """
    torch.manual_seed(seed)
    if name == "small":
        return nn.Sequential(nn.Linear(NUM_FEATURES, 32), nn.Tanh(), nn.Linear(32, NUM_CLASSES))
    if name == "two_buckets":
        return nn.Sequential(
            nn.Linear(NUM_FEATURES, 512),
            nn.Tanh(),
            nn.Linear(512, 512),
            nn.Tanh(),
            nn.Linear(512, NUM_CLASSES),
        )
    raise ValueError(name)


def make_dataset(num_samples: int = 256, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, NUM_FEATURES, generator=gen)
    w = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=gen)
    y = (x @ w + 0.5 * torch.randn(num_samples, NUM_CLASSES, generator=gen)).argmax(dim=1)
    return x, y


def rank_batch(
    data: tuple[torch.Tensor, torch.Tensor], rank: int, world_size: int, batch_size: int, batch_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch ``batch_index`` (counted across epochs) that rank ``rank`` sees in the runner, whose
    ranks read indices ``rank::world_size`` in order."""
    x, y = data
    n = x.shape[0]
    assert n % world_size == 0, "keep the dataset divisible so the sampler does not pad"
    indices = torch.arange(rank, n, world_size)
    per_epoch = math.ceil(indices.numel() / batch_size)
    b = batch_index % per_epoch
    chosen = indices[b * batch_size : (b + 1) * batch_size]
    return x[chosen], y[chosen]


def lr_at(step: int, base_lr: float, schedule: str, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` under the runner's per-step schedules."""
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":  # CosineAnnealingLR(T_max=total_steps), stepped every optimizer step
        return 0.5 * base_lr * (1 + math.cos(math.pi * step / total_steps))
    raise ValueError(schedule)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def run_distributed(
    tmp_path: Path, config: dict[str, Any], timeout: float = 240.0, runner: Path = RUNNER
) -> list[dict[str, Any]]:
    """Run ``distributed_runner.py`` (or another ``runner`` script, e.g. ``fabric_runner.py``) with
    ``config`` and return each rank's result dict, in rank order.

    One process per node (``num_nodes``, default 1) is started (:func:`launch.launch_nodes`), and
    Lightning or Fabric starts each node's ``devices`` (default 2) ranks, as in a user's script.
    ``record_start_state: true`` adds ``start_state``: the GMC hook state as training starts, after
    a checkpoint was restored.

    Raises:
        AssertionError: the run failed or hung; the message carries every process's output tail.
    """
    out_dir = _launch_runner(tmp_path, config, timeout, runner)
    return _rank_results(out_dir, config)


def run_distributed_cases(
    tmp_path: Path, cases: dict[str, dict[str, Any]], timeout: float | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Run several ``distributed_runner.py`` configs in one launch, one fit after another in the same
    processes, and return each case's per-rank results (as :func:`run_distributed` would). Saves a
    process start-up per case; every case needs the same ``devices`` and ``num_nodes``."""
    layouts = {(c.get("devices", 2), c.get("num_nodes", 1)) for c in cases.values()}
    if len(layouts) != 1:
        raise ValueError(f"cases of one launch need one rank layout, got {sorted(layouts)}")
    ((devices, num_nodes),) = layouts
    if timeout is None:
        timeout = 120.0 * max(2, len(cases))
    config = {"devices": devices, "num_nodes": num_nodes, "cases": cases}
    out_dir = _launch_runner(tmp_path, config, timeout, RUNNER)
    return {name: _rank_results(out_dir / name, config) for name, config in cases.items()}


def _launch_runner(tmp_path: Path, config: dict[str, Any], timeout: float, runner: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out_dir = tmp_path / f"run_{len(list(tmp_path.glob('run_*')))}"
    out_dir.mkdir()
    config = {**config, "out_dir": str(out_dir)}
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(config))
    launch_nodes([runner, config_path], int(config.get("num_nodes", 1)), cwd=out_dir, timeout=timeout)
    return out_dir


def _rank_results(out_dir: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    ranks = int(config.get("devices", 2)) * int(config.get("num_nodes", 1))
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(ranks)]


def run_distributed_error(tmp_path: Path, config: dict[str, Any], timeout: float = 240.0) -> str:
    """Run a config that is expected to fail; return its combined output."""
    try:
        run_distributed(tmp_path, config, timeout)
    except AssertionError as err:
        return str(err)
    raise AssertionError("the run was expected to fail but succeeded")


# ------------------------------------------------- replays of a run by the hand-written rules
def runner_problem(
    cfg: dict[str, Any], world_size: int = 2, autocast_bf16: bool = False
) -> reference.Problem:
    """A runner config as a :class:`reference.Problem`: the runner's model (fp32, one thread, as the
    ranks compute), and rank k's gradient at step t on the batches the runner gives it (averaged over
    ``accumulate_grad_batches``; forward and loss under CPU bf16 autocast for ``autocast_bf16``)."""
    torch.set_num_threads(1)  # the runner's ranks use one thread: same matmul rounding
    model = make_model(cfg.get("model", "small"), cfg.get("model_seed", 0))
    data = make_dataset(cfg.get("num_samples", 256), cfg.get("data_seed", 1))
    acc = cfg.get("accumulate_grad_batches", 1)
    params = list(model.parameters())
    numels = [p.numel() for p in params]

    def gradient(rank: int, x: torch.Tensor, step: int) -> torch.Tensor:
        with torch.no_grad():
            for p, value in zip(params, x.split(numels), strict=True):
                p.copy_(value.view_as(p))
        model.zero_grad()
        for micro in range(acc):
            xb, yb = rank_batch(data, rank, world_size, cfg["batch_size"], step * acc + micro)
            autocast = (
                torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
            )
            with autocast:
                loss = loss_fn(model, xb, yb)
            (loss / acc).backward()
        return torch.cat([p.grad.detach().reshape(-1) for p in params])

    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    w0 = torch.cat([p.detach().reshape(-1) for p in params])
    return reference.Problem(shapes, w0, gradient, world_size)


def replay_gmc(
    cfg: dict[str, Any],
    lrs: list[float],
    compress: reference.Compressor,
    world_size: int = 2,
    zero_gradient: tuple[int, int] | None = None,
    autocast_bf16: bool = False,
) -> dict[str, Any]:
    """GMC / GMC+ by hand (:func:`reference.gmc`) on a runner config (``model``, ``batch_size``,
    ``momentum``, ``weight_decay``, ``strategy_kwargs.detach`` and
    ``method_options.momentum_lr_convention``) for the given per-step learning rates.

    Args:
        zero_gradient: ``(step, rank)`` whose gradient counts as zero (a skipped non-finite bucket).
        autocast_bf16: evaluate forward and loss under CPU bf16 autocast (``precision="bf16-mixed"``).

    Returns:
        ``params`` (final w), ``residual`` (per rank) and ``momentum``, each by parameter name.
    """
    problem = runner_problem(cfg, world_size, autocast_bf16)
    strategy = cfg.get("strategy_kwargs", {})
    run = reference.gmc(
        problem,
        lrs,
        compress,
        beta=float(cfg["momentum"]),
        wd=float(cfg.get("weight_decay", 0.0)),
        detach=float(strategy.get("detach", 0.0)),
        convention=strategy.get("method_options", {}).get("momentum_lr_convention", "prev"),
        zero_gradient=zero_gradient,
    )
    return {
        "params": problem.split(run.w),
        "residual": [problem.split(e) for e in run.residual],
        "momentum": problem.split(run.momentum),
    }


def replay_sgd(cfg: dict[str, Any], lrs: list[float], world_size: int = 2) -> dict[str, torch.Tensor]:
    """Plain DDP with ``torch.optim.SGD(momentum, weight_decay)`` (:func:`reference.sgd`) on a runner
    config: the dense methods' degeneracy."""
    problem = runner_problem(cfg, world_size)
    w = reference.sgd(problem, lrs, momentum=float(cfg["momentum"]), wd=cfg.get("weight_decay", 0.0))
    return problem.split(w)


def assert_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """Every tensor of ``expected`` (by name) close to ``actual``'s."""
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name].to(tensor.dtype), tensor, msg=name, rtol=rtol, atol=atol)


# ------------------------------------------------- assertions on run_distributed results
def assert_two_buckets(results: list[dict[str, Any]], steps: int) -> None:
    """Every rank trained ``steps`` steps over at least two DDP buckets, the hook running for each."""
    for r in results:
        assert len(r["bucket_numels"]) >= 2, r["bucket_numels"]
        # step 0 runs with DDP's single bucket, later steps with the rebuilt layout: the hook ran for
        # every bucket of every step (on CPU too, where Lightning would skip registering it).
        assert r["hook_calls"] == 1 + (steps - 1) * len(r["bucket_numels"])
        assert r["gmc_step"] == steps


def assert_replicas_identical(results: list[dict[str, Any]]) -> None:
    """Rank 1's parameters equal rank 0's, bit for bit."""
    for name, tensor in results[0]["params"].items():
        assert torch.equal(tensor, results[1]["params"][name]), name


def assert_resumed_bitwise(straight: list[dict[str, Any]], resumed: list[dict[str, Any]]) -> None:
    """Per rank, a resumed run's parameters and every GMC buffer (local and shared) equal the
    uninterrupted run's, bit for bit."""
    for rank, (run, again) in enumerate(zip(straight, resumed, strict=True)):
        for name, tensor in run["params"].items():
            assert torch.equal(again["params"][name], tensor), (rank, name)
        for scope in ("local", "shared"):
            for buffer, by_name in run["gmc_state"][scope].items():
                for name, tensor in by_name.items():
                    assert torch.equal(again["gmc_state"][scope][buffer][name], tensor), (rank, buffer, name)
