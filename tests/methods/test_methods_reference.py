"""The baseline methods in the simulator against their update rules written out by hand.

References (docs/algorithms.md): 2.1 (DMSGD), 2.7-2.8 (the paper's Algorithms 3 and 4), 2.4 (DGC, the
paper's Remark 2), 2.5 (CSER / M-CSER), 2.6 (DEF-A), 3.8 (RCC, the paper's eq. (9)). Every reference
(``tests/methods_by_hand.py``) is an independent float64 loop over K = 2 workers (or
``torch.optim.SGD``); none calls the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from methods_by_hand import (
    BETA,
    COSINE,
    DENSITY,
    GRAD,
    LRS3,
    W0,
    WD,
    D,
    K,
    _flat,
    alg3_by_hand,
    alg4_by_hand,
    close,
    cser_by_hand,
    def_a_by_hand,
    dgc_by_hand,
    ef_local_momentum_by_hand,
    gmc_by_hand,
    identity,
    simulate,
    topk,
    torch_sgd,
)

from lightning_gmc import Simulator


# --------------------------------------------------- hand-written three-step references (top-k)
@pytest.mark.parametrize("mfm", [True, False], ids=["w-mfm", "wo-mfm"])
@pytest.mark.parametrize("wd_local", [False, True], ids=["wd-compressed", "wd-local"])
def test_dgc_three_steps_topk(mfm: bool, wd_local: bool) -> None:
    options = {"momentum_masking": mfm, "weight_decay_mode": "local" if wd_local else "compressed"}
    xs, _ = simulate("dgc", "topk", LRS3, **options)
    close(xs[0], dgc_by_hand(topk, LRS3, mfm, wd_local))


def test_cser_three_steps_topk_with_a_reset() -> None:
    # H = 2: step t = 2 resets with C2 = top-k at density 0.5, step 3 runs on un-synchronised models.
    options = {"reset_compressor": "topk", "reset_density": 0.5, "reset_interval": 2}
    xs, sim = simulate("cser", "topk", LRS3, **options)
    expected, residuals = cser_by_hand(topk, DENSITY, topk, 0.5, 2, LRS3)
    for k in range(K):
        close(xs[k], expected[k])
        close(_flat(sim.residual(k)), residuals[k])
    assert not torch.allclose(xs[0], xs[1])  # the models differ between resets


def test_def_a_three_steps_topk() -> None:
    xs, sim = simulate("def_a", "topk", LRS3, detach=0.3)
    expected, residuals = def_a_by_hand(topk, LRS3, 0.3)
    close(xs[0], expected)
    for k in range(K):
        close(_flat(sim.residual(k)), residuals[k])


def test_alg3_three_steps_topk() -> None:
    xs, _ = simulate("ef_server_momentum", "topk", LRS3)
    close(xs[0], alg3_by_hand(topk, LRS3)[0])


def test_alg4_three_steps_topk() -> None:
    xs, _ = simulate("gmc_lr_inside", "topk", LRS3)
    close(xs[0], alg4_by_hand(topk, LRS3))


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
    close(xs[0], gmc_by_hand(topk, constant))
    decayed, _ = simulate("gmc_lr_inside", "topk", COSINE)
    close(decayed[0], alg4_by_hand(topk, COSINE))
    assert not torch.allclose(decayed[0], gmc_by_hand(topk, COSINE), atol=1e-4)


def test_def_a_with_zero_coefficient_is_ef_with_local_momentum() -> None:
    xs, _ = simulate("def_a", "topk", COSINE, detach=0.0)
    close(xs[0], ef_local_momentum_by_hand(topk, COSINE))
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
    expected, _ = cser_by_hand(topk, DENSITY, identity, 1.0, 4, COSINE[:4])
    close(xs[0], expected[0])


# --------------------------------------------------------------------------------- RCC, eq. (9)
def test_cser_rcc_counts_both_compressors() -> None:
    # RCC = [sum_t (2 sum_k |C1|_0 + 2 |sum C1|_0) + sum_{reset t} (2 sum_k |C2|_0 + 2 |sum C2|_0)]
    #       / ((K+1) d T), from the supports the hand reference selects.
    period, d2, lrs = 2, 0.5, LRS3 + [0.04]
    x = [W0.clone() for _ in range(K)]
    m = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    r = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    floats = 0
    for t, lr in enumerate(lrs, start=1):
        masks, sent, deltas = [], [], []
        for k in range(K):
            m[k] = BETA * m[k] + GRAD(k, x[k], t - 1) + WD * x[k]
            deltas.append(lr * m[k])
            c, mask = topk(deltas[k], DENSITY)
            sent.append(c)
            masks.append(mask)
        floats += 2 * sum(int(mk.sum()) for mk in masks) + 2 * int((masks[0] | masks[1]).sum())
        for k in range(K):
            x[k] = x[k] - sum(sent) / K - (deltas[k] - sent[k])
            r[k] = r[k] + deltas[k] - sent[k]
        if t % period == 0:
            resets = [topk(r[k], d2) for k in range(K)]
            union = int((resets[0][1] | resets[1][1]).sum())
            floats += 2 * sum(int(mk.sum()) for _, mk in resets) + 2 * union
            for k in range(K):
                x[k] = x[k] + resets[k][0] - sum(c for c, _ in resets) / K
                r[k] = r[k] - resets[k][0]
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
