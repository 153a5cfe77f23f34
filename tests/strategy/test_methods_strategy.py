"""The baseline methods through ``GMCStrategy``'s constructor and Lightning's strategy registry (no
processes are started)."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import StrategyRegistry

import lightning_gmc
from lightning_gmc import GMCStrategy
from lightning_gmc.compressors import Identity
from lightning_gmc.methods import CSER, DEFA, DGC, DMSGD, EFServerMomentum, GMCLRInside

BASELINES = ["cser", "def_a", "dgc", "dmsgd", "ef_server_momentum", "gmc_lr_inside"]


def test_every_baseline_is_a_registered_strategy_name() -> None:
    for name in BASELINES:
        assert name in StrategyRegistry, name
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, GMCStrategy)
        assert strategy.gmc_method.name == name


def test_unknown_method_error_lists_every_name() -> None:
    with pytest.raises(ValueError, match="valid methods") as err:
        GMCStrategy(method="sgd")
    for name in [*BASELINES, "gmc"]:
        assert name in str(err.value)
    assert sorted(lightning_gmc.METHODS) == sorted([*BASELINES, "gmc", "ef", "ef21"])


def test_dmsgd_defaults_to_the_identity_and_rejects_compression() -> None:
    strategy = GMCStrategy(method="dmsgd")
    assert isinstance(strategy.gmc_method, DMSGD)
    assert isinstance(strategy.gmc_method.compressor, Identity)
    assert GMCStrategy().gmc_method.compressor.name == "topk"  # GMC keeps its default
    with pytest.raises(ValueError, match="identity compressor"):
        GMCStrategy(method="dmsgd", compressor="topk")


def test_detach_reaches_def_a_and_is_refused_by_methods_without_it() -> None:
    method = GMCStrategy(method="def_a", compressor="rbgs", detach=0.5).gmc_method
    assert isinstance(method, DEFA) and method.detach == 0.5
    assert GMCStrategy(method="def_a").gmc_method.detach == pytest.approx(0.3)  # the paper's default
    assert method.evaluation_point == "params_minus_mean_residual"
    plain = GMCStrategy(method="def_a", method_options={"evaluation": "x_t"}).gmc_method
    assert plain.evaluation_point == "params"
    for name in ("dgc", "cser", "gmc_lr_inside"):
        with pytest.raises(ValueError, match="no detach"):
            GMCStrategy(method=name, detach=0.3)


def test_method_options_travel_through_the_strategy() -> None:
    dgc = GMCStrategy(
        method="dgc",
        compressor="topk_approx",
        density=0.001,
        compressor_options={"sample_ratio": 0.02},
        method_options={"momentum_masking": False, "sparsity_warmup": True, "clip_norm": 2.0},
    ).gmc_method
    assert isinstance(dgc, DGC) and not dgc.momentum_masking and dgc.clip_norm == 2.0
    # warm-up compressors keep the kind and options, only the density changes
    assert [c.density for c in dgc.compressors()] == [0.001, 0.25, 0.0625, 0.015625, 0.004]
    assert {c.sample_ratio for c in dgc.compressors()} == {0.02}
    cser = GMCStrategy(
        method="cser", compressor="rbgs", density=1 / 64, method_options={"reset_interval": 16}
    )
    cser_method = cser.gmc_method
    assert isinstance(cser_method, CSER)
    assert cser_method.evaluation_point == "mean_params"
    assert cser_method.reset_compressor.name == "rbgs"
    assert cser_method.reset_compressor.density == pytest.approx(0.25)  # rho2 = H rho1 (CSER's scripts)
    assert isinstance(GMCStrategy(method="ef_server_momentum").gmc_method, EFServerMomentum)
    assert isinstance(GMCStrategy(method="gmc_lr_inside").gmc_method, GMCLRInside)


def test_impossible_combination_fails_in_the_constructor() -> None:
    with pytest.raises(ValueError, match="momentum_masking=False"):
        GMCStrategy(method="dgc", compressor="qsgd")
    with pytest.raises(ValueError, match="density"):
        GMCStrategy(
            method="dgc",
            compressor="scaled_sign",
            method_options={"momentum_masking": False, "sparsity_warmup": True},
        )
