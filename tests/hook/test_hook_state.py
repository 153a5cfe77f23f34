"""The hook state's configuration, optimizer takeover and checkpoints, in one process.

References: the user's optimizer settings as written in the test, hand-built checkpoints with one
poisoned tensor, and plain Lightning DDP resuming a GMC checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gmc import GMCConfig, GMCHookState, GMCStrategy, Simulator


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_rejected_everywhere(value: float) -> None:
    with pytest.raises(ValueError, match="detach must be >= 0 and finite"):
        GMCStrategy(detach=value)
    with pytest.raises(ValueError, match="detach must be >= 0 and finite"):
        Simulator({"w": (10,)}, 2, method="gmc", detach=value)
    with pytest.raises(ValueError, match="detach must be >= 0 and finite"):
        GMCConfig(method="gmc", detach=value)
    with pytest.raises(ValueError, match="density must be in"):
        GMCStrategy(density=value)
    with pytest.raises(ValueError, match="momentum must be in"):
        GMCStrategy(momentum=value)
    with pytest.raises(ValueError, match="momentum must be in"):
        Simulator({"w": (10,)}, 2, momentum=value)
    with pytest.raises(ValueError, match=r"method option clip_norm=.* must be finite"):
        GMCStrategy(method="dgc", method_options={"clip_norm": value})
    with pytest.raises(ValueError, match=r"method option sparsity_warmup=.* must be finite"):
        GMCStrategy(method="dgc", method_options={"sparsity_warmup": [0.25, value]})
    with pytest.raises(ValueError, match=r"compressor option sample_ratio=.* must be finite"):
        GMCStrategy(compressor="topk_approx", compressor_options={"sample_ratio": value})


def test_simulator_rejects_an_unknown_method_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'bogus'; valid methods: .*def_a.*gmc"):
        Simulator({"w": (10,)}, 2, method="bogus")


def test_config_is_frozen_and_builds_the_strategy_method() -> None:
    config = GMCConfig(method="gmc", compressor="rbgs", density=0.1, detach=0.5)
    with pytest.raises(AttributeError):
        config.density = 0.5  # type: ignore[misc]
    built = config.build()
    strategy_method = GMCStrategy(compressor="rbgs", density=0.1, detach=0.5).gmc_method
    assert built.describe() == strategy_method.describe()
    assert built.detach == strategy_method.detach == 0.5  # type: ignore[attr-defined]


def test_from_config_hands_every_field_to_the_hook_state() -> None:
    config = GMCConfig(
        compressor="rbgs",
        density=0.1,
        seed=7,
        momentum=0.5,
        nonfinite="raise",
        on_world_size_change="reset_residuals",
    )
    state = GMCHookState.from_config(config)
    assert (state.seed, state.nonfinite, state.on_world_size_change) == (7, "raise", "reset_residuals")
    assert state.hierarchy == "flat" and state.process_group is None
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state.attach(model, optimizer)
    assert state.worker is not None and state.worker.rng.seed == 7  # the method's random streams
    assert state.binding.momentum_override == 0.5  # applied instead of the optimizer's 0.9


def _attached(
    momentum: float = 0.9, weight_decay: float = 1e-3
) -> tuple[nn.Module, torch.optim.SGD, GMCHookState]:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    state = GMCHookState.from_config(GMCConfig(compressor="topk", density=0.5))
    state.attach(model, optimizer)
    return model, optimizer, state


def test_optimizer_state_dict_keeps_the_users_momentum_and_weight_decay() -> None:
    model, optimizer, state = _attached()
    saved = optimizer.state_dict()
    assert [(g["momentum"], g["weight_decay"]) for g in saved["param_groups"]] == [(0.9, 1e-3)]
    assert [(g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [(0.0, 0.0)]
    # a plain optimizer (plain DDP resuming) gets the user's values
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    plain.load_state_dict(saved)
    assert (plain.param_groups[0]["momentum"], plain.param_groups[0]["weight_decay"]) == (0.9, 1e-3)
    # loading into the attached optimizer takes over again: the guard of the next step stays quiet
    optimizer.load_state_dict(saved)
    assert (optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["weight_decay"]) == (0.0, 0.0)
    hypers = state.begin_step()
    assert (hypers[0].momentum, hypers[0].weight_decay) == (0.9, 1e-3)


def _poison(state: dict[str, Any], scope: str, buffer: str, name: str) -> dict[str, Any]:
    state[scope][buffer][name] = state[scope][buffer][name].clone()
    state[scope][buffer][name][0] = math.inf
    return state


def test_restored_momentum_and_residuals_must_be_finite() -> None:
    _, _, saved = _attached()
    _, _, target = _attached()
    with pytest.raises(ValueError, match=r"shared\['momentum'\]\['weight'\] holds non-finite"):
        target.load_state_dict(_poison(saved.state_dict(), "shared", "momentum", "weight"))
    with pytest.raises(ValueError, match=r"local\['residual'\]\['bias'\] holds non-finite"):
        target.load_state_dict(_poison(saved.state_dict(), "local", "residual", "bias"))
    gathered = saved.gathered_state_dict()
    gathered["per_rank_local"][0] = {
        "buffers": _poison(gathered["per_rank_local"][0], "buffers", "residual", "weight")["buffers"]
    }
    with pytest.raises(
        ValueError, match=r"per_rank_local\[0\]\.buffers\['residual'\]\['weight'\] holds non-finite"
    ):
        target.load_state_dict(gathered)


def test_gathered_state_round_trips_in_one_process() -> None:
    _, _, saved = _attached()
    for tensors in saved.worker.tensors.values():  # type: ignore[union-attr]
        for t in tensors:
            t.normal_()
    saved.clock.load(7, [0.05])
    _, _, target = _attached()
    target.load_state_dict(saved.gathered_state_dict())
    assert target.step == 7 and target.clock.last_lrs == [0.05]
    for name, tensors in saved.worker.tensors.items():  # type: ignore[union-attr]
        for a, b in zip(tensors, target.worker.tensors[name], strict=True):  # type: ignore[union-attr]
            assert torch.equal(a, b)


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _fit(strategy: Any, max_steps: int, ckpt_in: str | None = None, ckpt_out: str | None = None) -> L.Trainer:
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = DataLoader(
        TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0))), batch_size=4
    )
    trainer.fit(_Module(), loader, ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return trainer


def test_checkpoints_move_between_plain_ddp_and_gmc(tmp_path: Path) -> None:
    gmc_ckpt, ddp_ckpt = str(tmp_path / "gmc.ckpt"), str(tmp_path / "ddp.ckpt")
    _fit(GMCStrategy(compressor="topk", density=0.5), 2, ckpt_out=gmc_ckpt)
    # GMC -> plain DDP: the user's momentum and weight decay, not the takeover's zeros
    resumed = _fit(DDPStrategy(), 4, ckpt_in=gmc_ckpt, ckpt_out=ddp_ckpt)
    group = resumed.optimizers[0].param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-3)
    # plain DDP -> GMC: the method applies them, the optimizer step is plain SGD again
    strategy = GMCStrategy(compressor="topk", density=0.5)
    resumed = _fit(strategy, 6, ckpt_in=ddp_ckpt)
    group = resumed.optimizers[0].param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.0, 0.0)
    hypers = strategy.gmc_state.current_hypers()
    assert (hypers[0].momentum, hypers[0].weight_decay) == (0.9, 1e-3)
    assert strategy.gmc_state.step == 2  # steps run under GMC after the resume (4 -> 6)


def test_a_method_that_does_not_take_over_leaves_any_optimizer_alone() -> None:
    from lightning_gmc.methods import GMC

    class _KeepsOptimizer(GMC):
        takes_over_optimizer = False

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    state = GMCHookState(_KeepsOptimizer(GMCConfig(compressor="topk").build().compressor))
    state.attach(model, optimizer)  # no SGD check
    assert optimizer.param_groups[0]["weight_decay"] == 0.01  # untouched
    assert optimizer.state_dict()["param_groups"][0]["weight_decay"] == 0.01
    hypers = state.begin_step()
    assert (hypers[0].momentum, hypers[0].weight_decay) == (0.0, 0.0)  # the optimizer applies them
    with pytest.raises(TypeError, match="supports torch.optim.SGD"):
        GMCHookState(GMCConfig().build()).attach(model, optimizer)


def test_a_checkpoint_written_during_validation_keeps_the_training_parameters() -> None:
    # DEF-A evaluates w - c * mean residual; ModelCheckpoint saves while validation is at that point.
    model = nn.Linear(3, 2)
    state = GMCHookState.from_config(GMCConfig(method="def_a", compressor="topk", density=0.5))
    state.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for residual in state.worker.tensors["residual"]:  # type: ignore[union-attr]
        residual.normal_()
    training = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.enter_evaluation_point()
    evaluated = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert not torch.equal(evaluated["weight"], training["weight"])
    saved = state.gathered_state_dict()["per_rank_local"][0]["training_parameters"]
    with state.evaluation_point():  # already there: stays there when the block ends
        pass
    for name, p in model.named_parameters():
        assert torch.equal(saved[name], training[name])
        assert torch.equal(p, evaluated[name])
    state.exit_evaluation_point()
    for name, p in model.named_parameters():
        assert torch.equal(p, training[name])
