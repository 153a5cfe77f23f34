"""The in-process test problem: per-worker noisy quadratics, and a driver that runs the implementation
(:class:`lightning_gmc.Simulator`) on one, to compare with a rule of ``tests/reference.py``.

Worker k's gradient at step t is ``diag_k * w - target_k + noise_{t,k}`` (float64): each worker has
its own optimum (non-IID) and fresh noise every step. The simulator trains fp32 parameters, as a run
does; its model is handed back in float64.
"""

from __future__ import annotations

import math

import torch
from reference import Problem

from lightning_gmc import Simulator
from lightning_gmc.methods import Method

K = 2
BETA = 0.9
WD = 0.01
MAX_STEPS = 40


def cosine(steps: int, base_lr: float = 0.1) -> list[float]:
    """A cosine schedule over ``steps`` steps that never reaches 0 (the lr-inside methods need lr > 0)."""
    return [base_lr * 0.5 * (1 + math.cos(math.pi * t / steps)) + 1e-3 for t in range(steps)]


def quadratics(
    shapes: dict[str, tuple[int, ...]],
    *,
    seed: int = 0,
    target_scale: float = 2.0,
    start: str = "linspace",
    workers: int = K,
) -> Problem:
    """``workers`` noisy quadratics over parameters of ``shapes``, for up to ``MAX_STEPS`` steps,
    starting at ``w_0 = linspace(-1, 1)`` (``start="linspace"``) or 0 (``"zeros"``)."""
    d = sum(torch.Size(shape).numel() for shape in shapes.values())
    gen = torch.Generator().manual_seed(seed)
    diag = [torch.rand(d, generator=gen, dtype=torch.float64) * 1.5 + 0.5 for _ in range(workers)]
    target = [torch.randn(d, generator=gen, dtype=torch.float64) * target_scale for _ in range(workers)]
    noise = [
        [0.1 * torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(workers)]
        for _ in range(MAX_STEPS)
    ]

    def gradient(k: int, w: torch.Tensor, t: int) -> torch.Tensor:
        return diag[k] * w.double() - target[k] + noise[t][k]

    w0 = torch.linspace(-1.0, 1.0, d, dtype=torch.float64) if start == "linspace" else torch.zeros(d).double()
    return Problem(dict(shapes), w0, gradient, workers)


def as_params(problem: Problem, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat vector as the simulator's fp32 parameters (copies)."""
    return {name: t.to(torch.float32).clone() for name, t in problem.split(flat).items()}


def as_flat(problem: Problem, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The simulator's parameters (or gradients, residuals) as one float64 vector."""
    return torch.cat([params[name].reshape(-1) for name in problem.shapes]).double()


def simulate(
    problem: Problem,
    method: str | Method,
    compressor: str | None,
    lrs: list[float],
    *,
    density: float = 0.01,
    beta: float = BETA,
    wd: float = WD,
    epochs: list[int] | None = None,
    **options: object,
) -> tuple[list[torch.Tensor], Simulator]:
    """Train ``problem`` in the simulator (``method``: a name, or a built method, which brings its own
    compressor); return every worker's model (identical for one-model methods: checked every step)
    and the simulator."""
    sim = Simulator(
        {name: torch.zeros(shape) for name, shape in problem.shapes.items()},
        num_workers=problem.workers,
        method=method,
        compressor=compressor,
        density=density,
        momentum=beta,
        weight_decay=wd,
        **options,
    )
    per_worker = sim.method.evaluation_point == "mean_params"  # CSER: each worker its own model
    xs = [problem.w0.clone() for _ in range(problem.workers)]
    for t, lr in enumerate(lrs):
        if epochs is not None:
            sim.method.on_epoch_start(epochs[t])
        if per_worker:
            points = [as_params(problem, x) for x in xs]
        else:
            points = sim.gradient_points(as_params(problem, xs[0]), lr)
        grads = [
            as_params(problem, problem.gradient(k, as_flat(problem, points[k]), t)) for k in range(len(xs))
        ]
        directions = sim.step(grads, points, lr)
        if not per_worker:
            for other in directions[1:]:
                for name in problem.shapes:
                    assert torch.equal(other[name], directions[0][name])  # one global model
        # the optimizer's momentum-free step, in fp32 like torch.optim.SGD on fp32 parameters
        models = [as_params(problem, x) for x in xs]
        xs = [
            as_flat(problem, {n: models[k][n] - lr * directions[k][n] for n in problem.shapes})
            for k in range(len(xs))
        ]
    return xs, sim


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
