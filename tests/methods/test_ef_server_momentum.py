"""``method="ef_server_momentum"`` with a detached point ("GMC+ with momentum on the aggregate").

Algorithm 3 of the GMC paper (error feedback on gradients, momentum applied to the aggregate) with the
gradient taken at GMC+'s detached point ``w - detach * lr * e_k``. The references below are float64
loops over K = 2 workers written out by hand; none calls the implementation.
"""

from __future__ import annotations

import math

import pytest
import quadratic
import reference
import torch
from quadratic import BETA, WD, K, as_flat, close
from reference import TopK

from lightning_gmc import GMCStrategy, Simulator
from lightning_gmc.methods import EFServerMomentum, GroupHyper

PROBLEM = quadratic.quadratics({"a": (2, 3), "b": (4,)})
TOPK = TopK(0.34)
LRS3 = [0.1, 0.07, 0.05]
COSINE = quadratic.cosine(12)


def simulate(method: str, compressor: str, lrs: list[float], **options: object):
    return quadratic.simulate(PROBLEM, method, compressor, lrs, density=TOPK.density, **options)


def alg3_by_hand(lrs: list[float], detach: float = 0.0) -> reference.Run:
    return reference.ef_server_momentum(PROBLEM, lrs, TOPK, beta=BETA, wd=WD, detach=detach)


@pytest.mark.parametrize("lrs", [LRS3, COSINE], ids=["three-steps", "cosine"])
def test_detached_point_matches_the_hand_written_update(lrs: list[float]) -> None:
    xs, sim = simulate("ef_server_momentum", "topk", lrs, detach=0.5)
    run = alg3_by_hand(lrs, 0.5)
    expected, residuals, momentum = run.w, run.residual, run.momentum
    close(xs[0], expected)
    for k in range(K):
        close(as_flat(PROBLEM, sim.residual(k)), residuals[k])
        # the momentum is the same on every worker: it only ever sees the aggregate
        worker_momentum = {n: sim.workers[k].tensors["momentum"][i] for i, n in enumerate(("a", "b"))}
        close(as_flat(PROBLEM, worker_momentum), momentum)


def test_detach_zero_is_algorithm_3_and_detach_changes_the_trajectory() -> None:
    plain, _ = simulate("ef_server_momentum", "topk", COSINE, detach=0.0)
    close(plain[0], alg3_by_hand(COSINE).w)  # the paper's Algorithm 3, written out independently
    default, _ = simulate("ef_server_momentum", "topk", COSINE)
    close(default[0], alg3_by_hand(COSINE).w)
    detached, _ = simulate("ef_server_momentum", "topk", COSINE, detach=1.0)
    close(detached[0], alg3_by_hand(COSINE, 1.0).w)
    assert not torch.allclose(detached[0], plain[0], atol=1e-4)  # the detached point was active


def test_gradient_points_are_w_minus_detach_lr_residual() -> None:
    sim = Simulator(
        {"w": torch.zeros(8)},
        K,
        method="ef_server_momentum",
        compressor="rbgs",
        density=0.25,
        momentum=BETA,
        detach=0.3,
    )
    w = {"w": torch.linspace(-1, 1, 8)}
    for t, lr in enumerate([0.1, 0.05, 0.02]):
        points = sim.gradient_points(w, lr)
        for k in range(K):
            expected = w["w"] - 0.3 * lr * sim.workers[k].tensors["residual"][0]
            torch.testing.assert_close(points[k]["w"], expected)
        grads = [{"w": torch.randn(8, generator=torch.Generator().manual_seed(10 * t + k))} for k in range(K)]
        direction = sim.step(grads, points, lr)[0]
        w = {"w": w["w"] - lr * direction["w"]}
    # the residuals are non-zero after the first step, so the points really moved
    assert all(float(worker.tensors["residual"][0].abs().max()) > 0 for worker in sim.workers)


def test_strategy_takes_detach_and_validates_it() -> None:
    method = GMCStrategy(method="ef_server_momentum", compressor="rbgs", detach=0.5).gmc_method
    assert isinstance(method, EFServerMomentum) and method.detach == 0.5
    assert method.detach_scale(_hyper(lr=0.2)) == pytest.approx(0.1)  # gradient units: detach * lr
    assert "momentum on the aggregate" in method.describe()
    plain = GMCStrategy(method="ef_server_momentum").gmc_method
    assert isinstance(plain, EFServerMomentum) and plain.detach == 0.0
    assert plain.detach_scale(_hyper(lr=0.2)) == 0.0
    assert plain.describe().startswith("ef_server_momentum (Alg. 3)")  # unchanged: checkpoints compare it
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="detach"):
            GMCStrategy(method="ef_server_momentum", detach=bad)


def _hyper(lr: float) -> GroupHyper:
    return GroupHyper(lr=lr, prev_lr=lr, momentum=BETA, weight_decay=WD)
