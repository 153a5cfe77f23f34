"""Every bad input fails before training, with a message that says what to do; registered names."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gmc
from lightning_gmc import GMCFabricStrategy, GMCHookState, GMCStrategy, build_compressor, build_method


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"compressor": "bogus"}, r"unknown compressor 'bogus'; valid names: .*rbgs.*topk"),
        ({"method": "bogus"}, r"unknown method 'bogus'; valid methods: .*gmc"),
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        # refused by the configuration, not only by a sparsifier: compressors without a density too
        ({"density": 0.0, "compressor": "none"}, r"density must be in \(0, 1\]"),
        ({"density": 0.0, "compressor": "qsgd"}, r"density must be in \(0, 1\]"),
        ({"density": 1.5}, r"density must be in \(0, 1\]"),
        ({"detach": -0.1}, r"detach must be >= 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": -0.5}, r"momentum must be in \[0, 1\)"),
        ({"nonfinite": "ignore"}, r"nonfinite must be 'skip' or 'raise'"),
        ({"on_world_size_change": "guess"}, r"on_world_size_change must be"),
        ({"compressor_options": {"levels": 3}}, r"does not take option"),
        ({"method_options": {"bogus": 1}}, r"does not take option"),
        ({"hierarchy": "nodes"}, r"hierarchy must be 'flat' .* or 'node'"),
    ],
)
@pytest.mark.parametrize("strategy", [GMCStrategy, GMCFabricStrategy])
def test_bad_arguments_fail_at_construction(strategy: type, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        strategy(**kwargs)


@pytest.mark.parametrize(
    "key",
    ["ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period", "mixed_precision"],
)
@pytest.mark.parametrize("strategy", [GMCStrategy, GMCFabricStrategy])
def test_conflicting_ddp_arguments_are_rejected(strategy: type, key: str) -> None:
    with pytest.raises(ValueError, match=f"does not accept `{key}`"):
        strategy(**{key: object()})
    strategy(**{key: None})  # LightningCLI passes every DDP argument, None when unused


def _state() -> GMCHookState:
    return GMCHookState(build_method("gmc", build_compressor("topk", density=0.1)))


def test_only_sgd_is_supported() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="supports torch.optim.SGD.*got Adam"):
        _state().attach(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="nesterov=False"):
        _state().attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))


def test_sparse_gradients_and_unoptimized_parameters_are_rejected() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="sparse gradients"):
        _state().attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"not in the optimizer.*requires_grad_\(False\)"):
        _state().attach(model, torch.optim.SGD(model[0].parameters(), lr=0.1))


def test_attach_takes_over_momentum_and_weight_decay_per_group() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "momentum": 0.5, "weight_decay": 0.1},
            {"params": model[1].parameters()},
        ],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
    )
    state = _state()
    state.attach(model, optimizer)
    hypers = state.current_hypers()
    assert [(h.momentum, h.weight_decay) for h in hypers] == [(0.5, 0.1), (0.9, 1e-4)]
    assert all(g["momentum"] == 0 and g["weight_decay"] == 0 for g in optimizer.param_groups)
    # a scheduler (or a loaded state dict) putting momentum back is caught at the next step
    optimizer.param_groups[0]["momentum"] = 0.9
    with pytest.raises(RuntimeError, match="applies both itself"):
        state.begin_step()


def test_momentum_override() -> None:
    model = nn.Linear(3, 2)
    state = GMCHookState(build_method("gmc", build_compressor("topk")), momentum=0.3)
    state.attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert state.current_hypers()[0].momentum == 0.3


def test_loss_scaled_precision_is_rejected() -> None:
    strategy = GMCStrategy()
    strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="bf16-mixed"):
        strategy._check_precision()


class _ManualModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manual_optimization_is_rejected_before_training() -> None:
    trainer = L.Trainer(
        strategy=GMCStrategy(),
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    with pytest.raises(ValueError, match="automatic optimization"):
        trainer.fit(_ManualModule(), loader)


def test_registered_strategy_names() -> None:
    trainer = L.Trainer(strategy="gmc", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, GMCStrategy)
    assert trainer.strategy.gmc_method.compressor.name == "topk"
    trainer = L.Trainer(strategy="gmc_plus", accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy.gmc_method.compressor.name == "rbgs"
    assert trainer.strategy.gmc_method.detach == 0.5
    for name in lightning_gmc.METHODS:
        assert name in L.pytorch.strategies.StrategyRegistry


def test_unbiased_compressors_are_scaled_for_error_feedback() -> None:
    # natural compression has omega = 1/8: inside error feedback it is sent as C(x) / (1 + 1/8).
    x = torch.randn(1000)
    scaled = GMCStrategy(compressor="natural").gmc_method.compressor
    plain = GMCStrategy(compressor="natural", ef_scaling=False).gmc_method.compressor
    outs = []
    for compressor in (scaled, plain):
        from lightning_gmc.compressors import RandomStreams, segments_from_numels

        plan = compressor.plan(segments_from_numels([1000]))
        decoded = torch.zeros(1000)
        compressor.decompress_add(compressor.compress(x, plan, RandomStreams(0, 0), 0), plan, decoded)
        outs.append(decoded)
    torch.testing.assert_close(outs[0], outs[1] / (1 + 1 / 8))
    assert GMCStrategy(compressor="topk").gmc_method.compressor.name == "topk"  # contractive: unchanged


def test_dense_fallback_threshold_follows_the_wire_formula() -> None:
    from lightning_gmc.compressors import segments_from_numels
    from lightning_gmc.transport import choose_route

    plan_of = lambda name, density: build_compressor(name, density=density).plan(  # noqa: E731
        segments_from_numels([1000])
    )
    # all-gather (K-1) * 8k bytes against ring all-reduce 2 (K-1)/K * 4n: top-k pays while k/n < 1/K
    assert choose_route(build_compressor("topk", density=0.4), plan_of("topk", 0.4), 2) == "allgather"
    assert choose_route(build_compressor("topk", density=0.6), plan_of("topk", 0.6), 2) == "dense"
    assert choose_route(build_compressor("topk", density=0.1), plan_of("topk", 0.1), 8) == "allgather"
    assert choose_route(build_compressor("topk", density=0.2), plan_of("topk", 0.2), 8) == "dense"
    assert choose_route(build_compressor("rbgs", density=0.9), plan_of("rbgs", 0.9), 64) == "allreduce"
    assert choose_route(build_compressor("topk", density=0.9), plan_of("topk", 0.9), 1) == "local"


def test_checkpoint_of_another_model_is_rejected() -> None:
    small, large = nn.Linear(3, 2), nn.Linear(4, 2)
    saved = _state()
    saved.attach(small, torch.optim.SGD(small.parameters(), lr=0.1))
    other = _state()
    other.attach(large, torch.optim.SGD(large.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"has shape \(2, 3\).*\(2, 4\)"):
        other.load_state_dict(saved.state_dict())
    renamed = _state()
    model = nn.Sequential(nn.Linear(3, 2))
    renamed.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="does not match the model"):
        renamed.load_state_dict(saved.state_dict())
    different_method = GMCHookState(build_method("gmc", build_compressor("rbgs", density=0.1)))
    different_method.attach(small, torch.optim.SGD(small.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="checkpoint was written by"):
        different_method.load_state_dict(saved.state_dict())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_build_method_rejects_non_finite_options_without_the_config(value: float) -> None:
    # Plain-DDP users may call build_method directly, bypassing GMCConfig's validation.
    from lightning_gmc import build_compressor, build_method

    with pytest.raises(ValueError, match="finite"):
        build_method("gmc", build_compressor("topk", density=0.1), detach=value)
    with pytest.raises(ValueError, match="finite"):
        build_method("def_a", build_compressor("topk", density=0.1), detach=value)
