"""The baseline methods in the simulator against their update rules written out by hand.

References (docs/algorithms.md): 2.1 (DMSGD), 2.7-2.8 (the paper's Algorithms 3 and 4), 2.4 (DGC, the
paper's Remark 2), 2.5 (CSER / M-CSER), 2.6 (DEF-A), 3.8 (RCC, the paper's eq. (9)). Every reference
(``tests/reference.py``) is an independent float64 loop over K = 2 workers (or ``torch.optim.SGD``)
on per-worker noisy quadratics (``tests/quadratic.py``); none calls the implementation.
"""

from __future__ import annotations

import math

import pytest
import quadratic
import reference
import torch
from quadratic import BETA, WD, K, as_flat, close
from reference import Identity, TopK

from lightning_gmc import Simulator

PROBLEM = quadratic.quadratics({"a": (2, 3), "b": (4,)})
D = PROBLEM.w0.numel()
DENSITY = 0.34  # top-k keeps 2 of a's 6 and 1 of b's 4 coordinates
TOPK = TopK(DENSITY)
LRS3 = [0.1, 0.07, 0.05]  # three steps with a changing learning rate
COSINE = quadratic.cosine(12)
HYPER = {"beta": BETA, "wd": WD}


def simulate(method: str, compressor: str | None, lrs: list[float], **options: object):
    return quadratic.simulate(PROBLEM, method, compressor, lrs, density=DENSITY, **options)


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return as_flat(PROBLEM, tensors)


def torch_sgd(lrs: list[float], momentum: float, clip: float | None = None) -> torch.Tensor:
    return reference.sgd(PROBLEM, lrs, momentum=momentum, wd=WD, clip=clip)


# --------------------------------------------------- hand-written three-step references (top-k)
@pytest.mark.parametrize("mfm", [True, False], ids=["w-mfm", "wo-mfm"])
@pytest.mark.parametrize("wd_local", [False, True], ids=["wd-compressed", "wd-local"])
def test_dgc_three_steps_topk(mfm: bool, wd_local: bool) -> None:
    options = {"momentum_masking": mfm, "weight_decay_mode": "local" if wd_local else "compressed"}
    xs, _ = simulate("dgc", "topk", LRS3, **options)
    close(xs[0], reference.dgc(PROBLEM, LRS3, TOPK, **HYPER, masking=mfm, wd_local=wd_local))


def test_cser_three_steps_topk_with_a_reset() -> None:
    # H = 2: step t = 2 resets with C2 = top-k at density 0.5, step 3 runs on un-synchronised models.
    options = {"reset_compressor": "topk", "reset_density": 0.5, "reset_interval": 2}
    xs, sim = simulate("cser", "topk", LRS3, **options)
    run = reference.cser(PROBLEM, LRS3, TOPK, TopK(0.5), period=2, **HYPER)
    expected, residuals = run.models, run.residual
    for k in range(K):
        close(xs[k], expected[k])
        close(_flat(sim.residual(k)), residuals[k])
    assert not torch.allclose(xs[0], xs[1])  # the models differ between resets


def test_def_a_three_steps_topk() -> None:
    xs, sim = simulate("def_a", "topk", LRS3, detach=0.3)
    run = reference.def_a(PROBLEM, LRS3, TOPK, c=0.3, **HYPER)
    expected, residuals = run.w, run.residual
    close(xs[0], expected)
    for k in range(K):
        close(_flat(sim.residual(k)), residuals[k])


def test_alg3_three_steps_topk() -> None:
    xs, _ = simulate("ef_server_momentum", "topk", LRS3)
    close(xs[0], reference.ef_server_momentum(PROBLEM, LRS3, TOPK, **HYPER).w)


def test_alg4_three_steps_topk() -> None:
    xs, _ = simulate("gmc_lr_inside", "topk", LRS3)
    close(xs[0], reference.gmc_lr_inside(PROBLEM, LRS3, TOPK, **HYPER))


def test_dmsgd_three_steps() -> None:
    xs, _ = simulate("dmsgd", None, LRS3)  # the method's default compressor is the identity
    close(xs[0], torch_sgd(LRS3, BETA))


# ------------------------------------------------------------- degenerate cases (Remark 2 etc.)
def test_dgc_identity_without_masking_is_ddp_sgd_momentum() -> None:
    for wd in ("compressed", "local"):
        xs, _ = simulate("dgc", "none", COSINE, momentum_masking=False, weight_decay_mode=wd)
        close(xs[0], torch_sgd(COSINE, BETA))


def test_dgc_identity_with_masking_is_plain_sgd() -> None:
    xs, _ = simulate("dgc", "none", COSINE, momentum_masking=True)
    close(xs[0], torch_sgd(COSINE, 0.0))


@pytest.mark.parametrize("theta", [1.5, 7.5])  # every parameter clipped; only the larger ones
def test_dgc_local_clipping_is_per_parameter_with_threshold_over_sqrt_k(theta: float) -> None:
    xs, _ = simulate("dgc", "none", COSINE, momentum_masking=False, clip_norm=theta)
    expected = torch_sgd(COSINE, BETA, clip=theta / math.sqrt(K))
    close(xs[0], expected)
    assert not torch.allclose(expected, torch_sgd(COSINE, BETA), atol=1e-4)  # clipping was active


def test_alg3_identity_is_sgd_momentum() -> None:
    xs, _ = simulate("ef_server_momentum", "none", COSINE)
    close(xs[0], torch_sgd(COSINE, BETA))


def test_alg4_equals_gmc_at_constant_lr_and_differs_under_decay() -> None:
    constant = [0.05] * 12
    xs, _ = simulate("gmc_lr_inside", "topk", constant)
    close(xs[0], reference.gmc(PROBLEM, constant, TOPK, **HYPER).w)
    decayed, _ = simulate("gmc_lr_inside", "topk", COSINE)
    close(decayed[0], reference.gmc_lr_inside(PROBLEM, COSINE, TOPK, **HYPER))
    assert not torch.allclose(decayed[0], reference.gmc(PROBLEM, COSINE, TOPK, **HYPER).w, atol=1e-4)


def test_def_a_with_zero_coefficient_is_ef_with_local_momentum() -> None:
    xs, _ = simulate("def_a", "topk", COSINE, detach=0.0)
    close(xs[0], reference.ef_local_momentum(PROBLEM, COSINE, TOPK, **HYPER))
    detached, _ = simulate("def_a", "topk", COSINE, detach=0.3)
    assert not torch.allclose(detached[0], xs[0], atol=1e-4)


def test_cser_identity_compressors_is_synchronous_local_momentum_sgd() -> None:
    xs, sim = simulate("cser", "none", COSINE, reset_interval=3)
    expected = torch_sgd(COSINE, BETA)  # local momentum without compression = SGD momentum (eq. 6)
    for k in range(K):
        close(xs[k], expected)
        assert float(_flat(sim.residual(k)).abs().max()) == 0.0


def test_cser_full_reset_averages_the_models() -> None:
    # C2 = identity and H = 4: after step 4 every worker holds the same model, x_hat - 0.
    options = {"reset_compressor": "none", "reset_interval": 4}
    xs, _ = simulate("cser", "topk", COSINE[:4], **options)
    close(xs[0], xs[1])
    expected = reference.cser(PROBLEM, COSINE[:4], TOPK, Identity(), period=4, **HYPER).models
    close(xs[0], expected[0])


# --------------------------------------------------------------------------------- RCC, eq. (9)
def test_cser_rcc_counts_both_compressors() -> None:
    # RCC = [sum_t (2 sum_k |C1|_0 + 2 |sum C1|_0) + sum_{reset t} (2 sum_k |C2|_0 + 2 |sum C2|_0)]
    #       / ((K+1) d T), from the supports the hand reference selects.
    period, d2, lrs = 2, 0.5, LRS3 + [0.04]
    run = reference.cser(PROBLEM, lrs, TOPK, TopK(d2), period=period, **HYPER)
    assert len(run.supports) == len(lrs) + len(lrs) // period  # every step's C1, every reset's C2
    floats = sum(
        2 * sum(int(s.sum()) for s in message) + 2 * int((message[0] | message[1]).sum())
        for message in run.supports
    )
    expected = floats / ((K + 1) * D * len(lrs))
    _, sim = simulate("cser", "topk", lrs, reset_compressor="topk", reset_density=d2, reset_interval=period)
    assert sim.stats.take_step()["rcc"] == pytest.approx(expected)


def test_def_a_rcc_with_rbgs_is_the_density() -> None:
    sim = Simulator({"w": torch.zeros(1000)}, 4, method="def_a", compressor="rbgs", density=0.01)
    for _ in range(3):
        points = sim.gradient_points({"w": torch.zeros(1000)}, 0.1)
        sim.step([{"w": torch.randn(1000)} for _ in range(4)], points, 0.1)
    assert sim.stats.take_step()["rcc"] == pytest.approx(0.01)


def test_dmsgd_rcc_is_one() -> None:
    _, sim = simulate("dmsgd", None, LRS3)
    assert sim.stats.take_step()["rcc"] == pytest.approx(1.0)


# ---------------------------------------------------------------------- DGC sparsity warm-up
def test_dgc_sparsity_warmup_follows_the_paper_schedule_per_epoch() -> None:
    shapes = {"w": (2000,)}
    sim = Simulator(
        {n: torch.zeros(s) for n, s in shapes.items()},
        K,
        method="dgc",
        compressor="topk",
        density=0.001,
        sparsity_warmup=True,
    )
    description = sim.method.describe()
    densities = []
    for epoch in range(6):
        sim.method.on_epoch_start(epoch)
        points = sim.gradient_points({"w": torch.zeros(2000)}, 0.1)
        sim.step([{"w": torch.randn(2000)} for _ in range(K)], points, 0.1)
        densities.append(sim.stats.take_step()["density"])
        assert sim.method.describe() == description  # stable: checkpoints compare it on resume
    # 75 %, 93.75 %, 98.4375 %, 99.6 % sparsity, then the target 99.9 % (the DGC paper's warm-up)
    assert densities == pytest.approx([0.25, 0.0625, 0.0155, 0.004, 0.001, 0.001])


def test_dgc_warmup_never_goes_below_the_target_density() -> None:
    sim = Simulator(
        {"w": torch.zeros(100)}, K, method="dgc", compressor="topk", density=0.1, sparsity_warmup=[0.5, 0.05]
    )
    assert sim.method.warmup_densities == (0.5, 0.1)


# ------------------------------------------------------------------------------------ errors
def test_every_method_is_registered_and_listed_in_the_unknown_name_error() -> None:
    from lightning_gmc.compressors import build_compressor
    from lightning_gmc.methods import build_method

    names = ["cser", "def_a", "dgc", "dmsgd", "ef_server_momentum", "gmc", "gmc_lr_inside"]
    with pytest.raises(ValueError) as err:
        build_method("nope", build_compressor("topk"))
    for name in names:
        assert name in str(err.value)


def test_impossible_combinations_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="identity compressor"):
        Simulator({"w": (10,)}, K, method="dmsgd", compressor="topk")
    with pytest.raises(ValueError, match="momentum_masking=False"):
        Simulator({"w": (10,)}, K, method="dgc", compressor="scaled_sign")
    # without masking, DGC runs with any compressor
    Simulator({"w": (10,)}, K, method="dgc", compressor="scaled_sign", momentum_masking=False)
    with pytest.raises(ValueError, match="density"):
        Simulator(
            {"w": (10,)}, K, method="dgc", compressor="none", momentum_masking=False, sparsity_warmup=True
        )
    with pytest.raises(ValueError, match="reset_interval"):
        Simulator({"w": (10,)}, K, method="cser", compressor="topk", reset_interval=0)
    with pytest.raises(ValueError, match="detach"):
        Simulator({"w": (10,)}, K, method="def_a", compressor="topk", detach=-1.0)
    with pytest.raises(ValueError, match="does not take"):
        Simulator({"w": (10,)}, K, method="gmc_lr_inside", compressor="topk", detach=0.3)


def test_lr_inside_methods_reject_a_zero_learning_rate() -> None:
    for method in ("cser", "def_a", "gmc_lr_inside"):
        sim = Simulator({"w": (10,)}, K, method=method, compressor="topk", density=0.2)
        points = sim.gradient_points({"w": torch.zeros(10)}, 0.0)
        with pytest.raises(ValueError, match="lr > 0"):
            sim.step([{"w": torch.ones(10)}] * K, points, 0.0)


def test_quantizer_runs_with_every_method_that_accepts_it() -> None:
    # A biased, non-sparse, private-support compressor: every compressed method except DGC's
    # masking (rejected above) must run and stay finite.
    for method, options in [
        ("dgc", {"momentum_masking": False}),
        ("cser", {"reset_interval": 2}),
        ("def_a", {}),
        ("ef_server_momentum", {}),
        ("gmc_lr_inside", {}),
    ]:
        xs, _ = simulate(method, "scaled_sign", LRS3, **options)
        assert all(torch.isfinite(x).all() for x in xs), method
