"""The hook's README claims, exact, on one in-process rank (plain DDP + ``gmc_hook``, no Lightning).

Every run is compared with GMC written out by hand (per-parameter top-k, coupled L2, both learning-rate
conventions of the momentum term), so nothing here compares the implementation with itself:

* a run equals the hand-written step under ``"prev"`` and ``"cur"`` with a cosine schedule (``"cur"``
  needs the previous learning rate, which only the hook keeps);
* a run saved after 3 steps and resumed in a fresh model, optimizer and hook state equals the
  uninterrupted run bit for bit, for both conventions, and the saved learning-rate history is the
  previous step's learning rate;
* ``load_state_dict(load_local=False)`` (what ``on_world_size_change="reset_residuals"`` does) leaves
  zero residuals and keeps the global momentum, the step and the learning-rate history;
* a non-finite bucket gradient contributes exactly zero that step and keeps the residual and momentum;
* ``detach=0`` leaves the gradient point where it is, ``detach > 0`` moves it by ``detach * lr * e``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import reference
import torch
from reference import TopK
from torch import nn

from lightning_gmc import GMCHookState, build_compressor, build_method, gmc_hook

BETA = 0.9
WD = 0.01
DENSITY = 0.25
STEPS = 6
LRS = [0.1 * 0.5 * (1 + math.cos(math.pi * t / STEPS)) + 1e-3 for t in range(STEPS)]


pytestmark = pytest.mark.usefixtures("single_rank_group")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = _batch(step)
    return nn.functional.cross_entropy(model(x), y)


class HookRun:
    """A model trained through plain DDP with ``gmc_hook`` (one rank)."""

    def __init__(
        self, convention: str = "prev", detach: float = 0.0, nonfinite_at: int | None = None
    ) -> None:
        self.model = _model()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LRS[0], momentum=BETA, weight_decay=WD)
        # GMC is built without naming detach or the convention (their defaults: 0 and "prev")
        options = {"detach": detach} if detach else {}
        if convention != "prev":
            options["momentum_lr_convention"] = convention
        method = build_method("gmc", build_compressor("topk", density=DENSITY), **options)
        self.state = GMCHookState(method)
        self.state.attach(self.model, self.optimizer)
        self.ddp = nn.parallel.DistributedDataParallel(self.model)
        self.ddp.register_comm_hook(self.state, gmc_hook)
        self.nonfinite_at = nonfinite_at
        self.step_starts: list[dict[str, torch.Tensor]] = []
        self.gradient_points: list[dict[str, torch.Tensor]] = []

    def train(self, steps: range) -> None:
        for step in steps:
            for group in self.optimizer.param_groups:
                group["lr"] = LRS[step]
            self.step_starts.append(self.params())
            with self.state.detached_point():
                self.gradient_points.append(
                    {name: p.detach().clone() for name, p in self.model.named_parameters()}
                )
                loss = _loss(self.ddp, step)
                if step == self.nonfinite_at:
                    loss = loss * float("nan")
                loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()

    def params(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def buffer(self, name: str) -> dict[str, torch.Tensor]:
        state = self.state.state_dict()
        scope = "local" if name == "residual" else "shared"
        return state[scope][name]


def _problem() -> reference.Problem:
    """The run's model in float64 and its batches, one worker (K = 1)."""
    model = _model().double()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    numels = [p.numel() for p in model.parameters()]

    def gradient(k: int, x: torch.Tensor, step: int) -> torch.Tensor:
        with torch.no_grad():
            for p, value in zip(model.parameters(), x.split(numels), strict=True):
                p.copy_(value.view_as(p))
        model.zero_grad()
        xb, yb = _batch(step)
        nn.functional.cross_entropy(model(xb.double()), yb).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return reference.Problem(shapes, w0, gradient, workers=1)


def _gmc_by_hand(convention: str, detach: float = 0.0, zero_grad_at: int | None = None) -> dict[str, Any]:
    """GMC (GMC+ for ``detach > 0``) for K = 1 in float64 (``reference.gmc``), by parameter name."""
    problem = _problem()
    skip = None if zero_grad_at is None else (zero_grad_at, 0)
    run = reference.gmc(
        problem,
        LRS,
        TopK(DENSITY),
        beta=BETA,
        wd=WD,
        detach=detach,
        convention=convention,
        zero_gradient=skip,
    )
    return {
        "params": problem.split(run.w),
        "residual": problem.split(run.residual[0]),
        "momentum": problem.split(run.momentum),
    }


def _close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name].double(), tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("convention", ["prev", "cur"])
def test_hook_equals_the_hand_written_gmc_step(convention: str) -> None:
    run = HookRun(convention)
    run.train(range(STEPS))
    expected = _gmc_by_hand(convention)
    _close(run.params(), expected["params"])
    _close(run.buffer("residual"), expected["residual"])
    _close(run.buffer("momentum"), expected["momentum"])
    # the two conventions really differ on this schedule, so the comparison can tell them apart
    other = _gmc_by_hand("cur" if convention == "prev" else "prev")["params"]
    assert any((other[n] - expected["params"][n]).abs().max() > 1e-4 for n in other)


@pytest.mark.parametrize("convention", ["prev", "cur"])
def test_resume_through_the_hook_is_bitwise_equal(convention: str) -> None:
    straight = HookRun(convention)
    straight.train(range(STEPS))

    first = HookRun(convention)
    first.train(range(STEPS // 2))
    saved_state = first.state.state_dict()
    saved_params = first.params()
    # the learning-rate history is the previous step's learning rate
    assert saved_state["last_lrs"] == [LRS[STEPS // 2 - 1]]
    assert saved_state["step"] == STEPS // 2

    resumed = HookRun(convention)  # fresh model, optimizer (with momentum and wd again), hook state
    with torch.no_grad():
        for name, p in resumed.model.named_parameters():
            p.copy_(saved_params[name])
    resumed.state.load_state_dict(saved_state)
    resumed.train(range(STEPS // 2, STEPS))

    for name, tensor in straight.params().items():
        assert torch.equal(resumed.params()[name], tensor), name
    for buffer in ("residual", "momentum"):
        for name, tensor in straight.buffer(buffer).items():
            assert torch.equal(resumed.buffer(buffer)[name], tensor), (buffer, name)
    assert resumed.state.state_dict()["last_lrs"] == [LRS[-1]]


def test_reset_residuals_zeroes_them_and_keeps_the_momentum() -> None:
    first = HookRun("cur")
    first.train(range(STEPS // 2))
    saved_state = first.state.state_dict()
    assert any(t.abs().sum() > 0 for t in saved_state["local"]["residual"].values())

    resumed = HookRun("cur")
    resumed.state.load_state_dict(saved_state, load_local=False)
    after = resumed.state.state_dict()
    for name, tensor in after["local"]["residual"].items():
        assert torch.count_nonzero(tensor) == 0, name
    for name, tensor in saved_state["shared"]["momentum"].items():
        assert tensor.abs().sum() > 0
        assert torch.equal(after["shared"]["momentum"][name], tensor), name
    assert after["step"] == saved_state["step"] and after["last_lrs"] == saved_state["last_lrs"]


def test_nonfinite_bucket_contributes_zero_and_keeps_the_state() -> None:
    skip_at = 3
    run = HookRun("prev", nonfinite_at=skip_at)
    run.train(range(STEPS))
    assert run.state.take_metrics()["nonfinite_skips"] == 1
    # the reference: the same run whose gradient at that step is zero, state untouched
    expected = _gmc_by_hand("prev", zero_grad_at=skip_at)
    _close(run.params(), expected["params"])
    _close(run.buffer("residual"), expected["residual"])
    _close(run.buffer("momentum"), expected["momentum"])


@pytest.mark.parametrize("detach", [0.0, 0.5])
def test_gmc_plus_equals_the_hand_written_step_and_detach_zero_is_gmc(detach: float) -> None:
    run = HookRun("prev", detach=detach)
    run.train(range(STEPS))
    # GMC+ with detach 0 is the hand-written GMC step (not a second run of itself)
    expected = _gmc_by_hand("prev", detach=detach)
    _close(run.params(), expected["params"])
    _close(run.buffer("residual"), expected["residual"])
    moved = [
        any(not torch.equal(point[n], start[n]) for n in start)
        for point, start in zip(run.gradient_points, run.step_starts, strict=True)
    ]
    if detach == 0.0:
        assert not any(moved)  # the gradient is taken at w_t itself
    else:
        assert moved == [False] + [True] * (STEPS - 1)  # w_t - detach lr e once e != 0
        assert any(
            (expected["params"][n] - _gmc_by_hand("prev")["params"][n]).abs().max() > 1e-4
            for n in expected["params"]
        )


def test_gathered_state_of_another_world_size_errors_or_resets_residuals() -> None:
    # A checkpoint block written by 2 ranks (the second rank's residual differs), loaded by 1 rank.
    first = HookRun("cur")
    first.train(range(STEPS // 2))
    block = first.state.gathered_state_dict()
    assert block["world_size"] == 1 and len(block["per_rank_local"]) == 1
    other = {
        "buffers": {
            "residual": {n: t + 1.0 for n, t in block["per_rank_local"][0]["buffers"]["residual"].items()}
        }
    }
    two_ranks = {**block, "world_size": 2, "per_rank_local": [block["per_rank_local"][0], other]}

    strict = HookRun("cur")
    with pytest.raises(RuntimeError, match="written by 2 ranks, this run has 1.*reset_residuals"):
        strict.state.load_state_dict(two_ranks)

    resumed = HookRun("cur")
    resumed.state.on_world_size_change = "reset_residuals"
    resumed.state.load_state_dict(two_ranks)
    after = resumed.state.state_dict()
    assert all(torch.count_nonzero(t) == 0 for t in after["local"]["residual"].values())
    for name, tensor in block["shared"]["momentum"].items():
        assert tensor.abs().sum() > 0 and torch.equal(after["shared"]["momentum"][name], tensor), name
    assert after["step"] == STEPS // 2 and after["last_lrs"] == [LRS[STEPS // 2 - 1]]

    # the same world size: this rank's own entry (rank 0's residual, not rank 1's)
    same = HookRun("cur")
    same.state.load_state_dict(block)
    for name, tensor in block["per_rank_local"][0]["buffers"]["residual"].items():
        assert torch.equal(same.state.state_dict()["local"]["residual"][name], tensor), name


def test_hook_metrics_report_the_residual_norm_and_count_skips_over_the_run() -> None:
    run = HookRun("prev", nonfinite_at=1)
    run.train(range(3))
    first = run.state.take_metrics()
    residual = torch.cat([t.reshape(-1) for t in run.buffer("residual").values()])
    assert residual.abs().sum() > 0
    assert first["residual_norm"] == pytest.approx(float(residual.double().square().sum()) ** 0.5, rel=1e-6)
    assert first["nonfinite_skips"] == 1
    run.nonfinite_at = 4
    run.train(range(3, STEPS))
    assert run.state.take_metrics()["nonfinite_skips"] == 2  # a run total, like the byte totals


def test_resume_restores_the_run_totals_of_the_metrics() -> None:
    first = HookRun("prev", nonfinite_at=1)
    first.train(range(STEPS // 2))
    saved_state = first.state.state_dict()
    resumed = HookRun("prev")
    resumed.state.load_state_dict(saved_state)
    resumed.train(range(STEPS // 2, STEPS))
    assert resumed.state.take_metrics()["nonfinite_skips"] == 1  # the skip before the checkpoint
