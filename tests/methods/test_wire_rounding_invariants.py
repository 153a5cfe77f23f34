"""What a 16-bit wire may round, and what it may not: the invariants of every method, over 120 steps.

On a summing route (shared support: ``rbgs``, ``topk_shared``, the identity; and the dense fallback)
the exchange adds the workers' 16-bit values in fp32, in rank order, and rounds each sum to 16 bits
once, on the worker that owns that chunk of the sum; that worker hands what the rounding did not
deliver, ``r = S - round16(S)``, to its method (docs/algorithms.md 3.12). The invariants below are
then exact up to fp32 rounding, where without the correction they drift as a random walk (EF21's
``|h - mean_k h_k| / |h|`` was 2e-2 after 100 steps with ``rbgs`` bf16):

* EF21: the shared estimate ``h`` equals ``mean_k h_k``;
* error feedback (``ef``, ``gmc``, ``dgc``, ``def_a``, ``ef_server_momentum``, ``gmc_lr_inside``):
  what the workers meant to send is delivered or kept, ``sum_t sum_k p_k = K sum_t mean_t +
  sum_k e_k`` (``p_k`` the vector error feedback compresses, ``mean_t`` the aggregate);
* CSER: the average of the workers' models moves by exactly the mean of their updates,
  ``sum_k (x_k^0 - x_k^T) = sum_t sum_k eta d_k`` (the residual change is part of each worker's move).

Written out by hand from the update rules (docs/algorithms.md section 2), with momentum and weight
decay 0 so that ``p_k`` is the gradient plus the residual (GMC with momentum has its own case), and
``lr = 0.5`` so the methods that keep the learning rate inside divide and multiply exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_gmc import Simulator

K = 4
STEPS = 120
LR = 0.5
SHAPES = {"w": (24, 8), "b": (8,), "c": (13,)}
D = sum(torch.Size(s).numel() for s in SHAPES.values())

#: compressor options per route; top-k at density 0.5 with K = 4 falls back to the dense all-reduce
ROUTES: dict[str, dict[str, Any]] = {
    "rbgs": {"compressor": "rbgs", "density": 0.1},
    "topk_shared": {"compressor": "topk_shared", "density": 0.1},
    "identity": {"compressor": "none"},
    "dense_fallback": {"compressor": "topk", "density": 0.5},
}

#: method name -> (simulator options, learning rate inside the residual)
ERROR_FEEDBACK: dict[str, tuple[dict[str, Any], bool]] = {
    "ef": ({}, False),
    "gmc": ({"momentum": 0.0}, False),
    "dgc": ({"momentum": 0.0, "momentum_masking": False}, False),
    "ef_server_momentum": ({"momentum": 0.0}, False),
    "def_a": ({"momentum": 0.0, "detach": 0.0, "evaluation": "x_t"}, True),
    "gmc_lr_inside": ({"momentum": 0.0}, True),
}


def _grads(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    return [{name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()} for _ in range(K)]


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name in SHAPES]).double()


def _run(sim: Simulator, step_hook: Any) -> None:
    gen = torch.Generator().manual_seed(11)
    params = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for _ in range(STEPS):
        grads = _grads(gen)
        directions = sim.step(grads, sim.gradient_points(params, LR), LR)
        step_hook(grads, directions)


def _relative(difference: torch.Tensor, reference: torch.Tensor) -> float:
    return float(difference.norm() / reference.norm())


def _ef21_drift(wire: str, route: str) -> float:
    sim = Simulator(SHAPES, K, method="ef21", wire_dtype=wire, **ROUTES[route])
    _run(sim, lambda grads, directions: None)
    h = _flat(sim.workers[0].state_dict("shared")["aggregate"])
    mean_h = sum(_flat(w.state_dict("local")["estimate"]) for w in sim.workers) / K
    assert all(torch.equal(_flat(w.state_dict("shared")["aggregate"]), h) for w in sim.workers)
    return _relative(h - mean_h, h)


def _ledger(method: str, wire: str, route: str, momentum: float | None = None) -> float:
    """``|sum_t sum_k p_k - (K sum_t mean_t + sum_k e_k)| / |sum_t sum_k p_k|``."""
    options, lr_inside = ERROR_FEEDBACK[method]
    if momentum is not None:
        options = {**options, "momentum": momentum}
    sim = Simulator(SHAPES, K, method=method, wire_dtype=wire, **ROUTES[route], **options)
    beta = options.get("momentum") or 0.0
    scale = LR if lr_inside else 1.0
    sent = torch.zeros(D, dtype=torch.float64)
    delivered = torch.zeros(D, dtype=torch.float64)
    previous = torch.zeros(D, dtype=torch.float64)

    def account(grads: list[dict[str, torch.Tensor]], directions: list[dict[str, torch.Tensor]]) -> None:
        nonlocal previous
        direction = _flat(directions[0])
        # p_k = e_k + scale g_k (+ beta m_{t-1} for GMC, whose direction is m_t); e_k enters the ledger
        # at the end, as the residuals left over
        for grad in grads:
            sent.add_(_flat(grad), alpha=scale)
        if method == "gmc":
            sent.add_(previous, alpha=K * beta)
        delivered.add_(direction, alpha=K * scale)  # the aggregate: direction (x lr when lr is inside)
        previous = direction

    _run(sim, account)
    kept = sum(_flat(sim.residual(k)) for k in range(K))
    return _relative(sent - (delivered + kept), sent)


def _cser_drift(wire: str, route: str) -> float:
    options = {"momentum": 0.0, "reset_interval": 4, "wire_dtype": wire, **ROUTES[route]}
    sim = Simulator(SHAPES, K, method="cser", **options)
    meant = torch.zeros(D, dtype=torch.float64)
    moved = torch.zeros(D, dtype=torch.float64)

    def account(grads: list[dict[str, torch.Tensor]], directions: list[dict[str, torch.Tensor]]) -> None:
        for grad, direction in zip(grads, directions, strict=True):
            meant.add_(_flat(grad), alpha=LR)  # d_k = lr m_k = lr g_k (momentum 0)
            moved.add_(_flat(direction), alpha=LR)  # worker k's model moves by lr * its direction

    _run(sim, account)
    return _relative(meant - moved, meant)


# fp32 rounding over 120 steps stays below 1e-6 in every case (the fp32 wire, where nothing is rounded
# to 16 bits, is the control); the uncorrected 16-bit sum drifts to 1e-3..1e-2.
TOLERANCE = 2e-6


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("wire", ["bf16", "fp16", "fp32"])
def test_ef21_aggregate_stays_the_mean_of_the_estimates(wire: str, route: str) -> None:
    assert _ef21_drift(wire, route) < TOLERANCE


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("method", list(ERROR_FEEDBACK))
def test_error_feedback_delivers_or_keeps_everything_sent(method: str, route: str) -> None:
    assert _ledger(method, "bf16", route) < TOLERANCE
    assert _ledger(method, "fp32", route) < TOLERANCE


@pytest.mark.parametrize("route", ["rbgs", "identity"])
def test_gmc_with_momentum_delivers_or_keeps_everything_sent(route: str) -> None:
    assert _ledger("gmc", "bf16", route, momentum=0.9) < TOLERANCE


@pytest.mark.parametrize("route", list(ROUTES))
def test_cser_average_model_follows_the_mean_update(route: str) -> None:
    assert _cser_drift("bf16", route) < TOLERANCE
    assert _cser_drift("fp32", route) < TOLERANCE
