"""density="auto" in one process: its options and their validation, the Trainer and Fabric wiring,
metrics and checkpoints, and the controller's schedule (the multi-rank cases are in
tests/distributed/test_auto_density_distributed.py)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gmc import GMCConfig, GMCFabricStrategy, GMCHookState, GMCStrategy, Simulator
from lightning_gmc.compressors import Identity, TopK
from lightning_gmc.config import AutoDensity
from lightning_gmc.hook.auto_density import Measurement


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(32, 8)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader(n: int = 64) -> DataLoader:
    return DataLoader(
        TensorDataset(torch.randn(n, 32, generator=torch.Generator().manual_seed(0))), batch_size=4
    )


# --------------------------------------------------------------------------------- configuration
def test_auto_starts_at_min_density_or_the_pin() -> None:
    config = GMCConfig(compressor="topk", density="auto")
    assert config.auto == AutoDensity() and config.initial_density == 0.01
    assert config.build().compressor == TopK(density=0.01)
    pinned = GMCConfig(compressor="topk", density="auto", auto_density={"pin": 0.05, "max_density": 0.2})
    assert pinned.auto is not None and pinned.auto.max_density == 0.2
    assert pinned.build().compressor == TopK(density=0.05)
    # an instance's own density is replaced too
    assert GMCConfig(compressor=TopK(density=0.3), density="auto").build().compressor == TopK(density=0.01)
    assert GMCConfig(compressor="topk", density=0.02).auto is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "dmsgd"}, "dense by definition"),
        ({"method": "dgc"}, "changes or combines its compressors"),
        ({"method": "cser"}, "changes or combines its compressors"),
        ({"compressor": "qsgd"}, "chooses the density of a sparsifier"),
        ({"hierarchy": "node"}, r"hierarchy='flat'.*python -m lightning_gmc.plan"),
        ({"auto_density": {"min_density": 0.2, "max_density": 0.1}}, "above max_density"),
        ({"auto_density": {"interval": 2}}, "interval"),
        ({"auto_density": {"warmup_steps": 1}}, "warmup_steps"),
        ({"auto_density": {"trial_steps": 2}}, "trial_steps must be an int >= 4"),
        ({"auto_density": {"explore": -0.1}}, "explore must be a finite number >= 0"),
        ({"auto_density": {"pin": 1.5}}, r"density must be in \(0, 1\]"),
        ({"auto_density": {"comm_fraction": -1.0}}, "comm_fraction"),
        ({"auto_density": {"minimum": 0.1}}, r"does not take \['minimum'\]"),
    ],
)
def test_bad_auto_settings_name_the_fix(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GMCConfig(**{"density": "auto", **kwargs})


def test_the_simulator_refuses_auto() -> None:
    with pytest.raises(ValueError, match="simulator runs a fixed density"):
        Simulator({"w": torch.zeros(10)}, num_workers=2, density="auto")  # type: ignore[arg-type]


def test_auto_options_need_density_auto() -> None:
    with pytest.raises(ValueError, match="set density='auto'"):
        GMCConfig(density=0.01, auto_density={"max_density": 0.1})


# ------------------------------------------------------------------------------ the controller
def _attached(options: dict[str, Any]) -> tuple[GMCHookState, torch.optim.Optimizer, nn.Module]:
    model = nn.Linear(64, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = GMCHookState.from_config(GMCConfig(compressor="topk", density="auto", auto_density=options))
    state.attach(model, optimizer)
    return state, optimizer, model


def _step(state: GMCHookState, optimizer: torch.optim.Optimizer) -> None:
    """One step as the hook clocks it (begin at the first bucket, end at the last), then the optimizer."""
    state.begin_step()
    state.end_step()
    optimizer.step()


def test_decisions_follow_the_schedule_and_switch_between_steps() -> None:
    state, optimizer, _ = _attached({"warmup_steps": 4, "trial_steps": 4, "interval": 5, "explore": 0.0})
    auto = state.auto
    assert auto is not None
    auto.measure = lambda: Measurement(step_s=0.01, latency_s=0.0, link_bps=float("inf"))
    for _ in range(3):
        _step(state, optimizer)
    assert auto.history == [] and state.method.compressor == TopK(density=0.01)
    _step(state, optimizer)  # step 4: the first decision, one worker: no communication, dense is fastest
    assert [d["step"] for d in auto.history] == [4] and auto.history[0]["density"] is None
    assert state.method.compressor == Identity() and auto.metrics()["auto_density"] == 1.0
    assert auto.history[0]["trial"] and auto.next_decision == 8  # unmeasured: confirmed after warm-up
    for _ in range(4):
        _step(state, optimizer)
    assert [d["step"] for d in auto.history] == [4, 8] and not auto.history[1]["trial"]
    assert auto.history[1]["density"] is None and state.method.compressor == Identity()
    assert auto.next_decision == 13 and auto.measured_steps == {}  # the round ended
    for _ in range(5):
        _step(state, optimizer)
    assert [d["step"] for d in auto.history] == [4, 8, 13]


def _measured_by_density(auto: Any, steps: dict[float | None, float]) -> None:
    """Measurements whose step time depends on the setting that ran (the link is free: one worker)."""
    auto.measure = lambda: Measurement(step_s=steps[auto.density], latency_s=0.0, link_bps=float("inf"))


@pytest.mark.parametrize(
    ("steps", "kept"),
    [
        # the cost model predicts the dense route fastest on one worker; measured, it is 2.5x slower
        ({0.01: 0.02, None: 0.05}, 0.01),
        # 8 % slower: within the 10 % hysteresis, but a trial stays only if it wins (the 5 % slack
        # for a denser setting still applies; 8 % is beyond it)
        ({0.01: 0.0200, None: 0.0216}, 0.01),
        # measured faster: the trial stays
        ({0.01: 0.05, None: 0.02}, None),
    ],
    ids=["refuted", "slightly-slower", "confirmed"],
)
def test_a_trial_stays_only_if_its_measured_step_wins(
    steps: dict[float | None, float], kept: float | None
) -> None:
    state, optimizer, _ = _attached({"warmup_steps": 4, "trial_steps": 4, "interval": 20, "explore": 0.0})
    auto = state.auto
    assert auto is not None
    _measured_by_density(auto, steps)
    for _ in range(8):
        _step(state, optimizer)
    assert [(d["step"], d["density"], d["trial"]) for d in auto.history] == [
        (4, None, True),
        (8, kept, False),
    ]
    assert auto.history[1]["predicted_step_s"] == steps[kept]  # the measured step, not a prediction
    assert state.method.compressor == (Identity() if kept is None else TopK(density=kept))
    assert auto.next_decision == 28 and auto.measured_steps == {}  # the round ended


def test_a_close_call_is_tried_before_the_round_ends() -> None:
    state, optimizer, _ = _attached({"warmup_steps": 4, "trial_steps": 4, "interval": 20, "explore": 0.3})
    auto = state.auto
    assert auto is not None
    steps = {None: 0.012, 0.01: 0.010, 0.02: 0.040, 0.05: 0.040, 0.1: 0.040}
    _measured_by_density(auto, steps)
    for _ in range(12):
        _step(state, optimizer)
    first, second, third = auto.history
    # step 4: one worker, the rule predicts the dense route fastest: a trial (measured 12 ms)
    assert (first["step"], first["density"], first["trial"]) == (4, None, True)
    # step 8: the rule keeps the measured 1 % (10 ms); the denser settings, predicted from the dense
    # route's 12 ms, are within 30 % of it and unmeasured: the fastest predicted is tried
    assert second["step"] == 8 and second["trial"] and second["density"] in (0.02, 0.05, 0.1)
    assert second["reason"].startswith("trial: predicted within 0.3 of the measured")
    # step 12: it measured 40 ms, the others predicted from it are not close: 1 % is kept, round over
    assert (third["step"], third["density"], third["trial"]) == (12, 0.01, False)
    assert state.method.compressor == TopK(density=0.01) and auto.measured_steps == {}
    assert auto.next_decision == 32


def test_a_checkpoint_within_a_trial_keeps_what_was_measured() -> None:
    state, optimizer, _ = _attached({"warmup_steps": 4, "trial_steps": 4, "interval": 20, "explore": 0.0})
    auto = state.auto
    assert auto is not None
    _measured_by_density(auto, {0.01: 0.02, None: 0.05})
    for _ in range(4):
        _step(state, optimizer)
    saved = state.state_dict()
    assert saved["auto_density"]["measured_steps"] == [[0.01, 0.02]]
    fresh, fresh_optimizer, _ = _attached(
        {"warmup_steps": 4, "trial_steps": 4, "interval": 20, "explore": 0.0}
    )
    fresh.load_state_dict(saved)
    assert fresh.auto is not None and fresh.auto.measured_steps == {0.01: 0.02}
    saved["auto_density"]["measured_steps"] = [[0.01, "fast"]]
    with pytest.raises(ValueError, match=r"measured_steps must be a list of \[density, seconds\]"):
        fresh.load_state_dict(saved)


def test_only_timed_steps_enter_the_measurement() -> None:
    state, optimizer, _ = _attached({"warmup_steps": 6, "trial_steps": 6, "interval": 0})
    auto = state.auto
    assert auto is not None
    for _ in range(5):
        _step(state, optimizer)
    assert len(auto._intervals) == 2  # 4 intervals after the first step, the first 2 are not timed
    optimizer.step()  # an optimizer step without a gradient exchange: the clock did not move
    assert len(auto._intervals) == 2
    _step(state, optimizer)
    assert len(auto.history) == 1  # at step 6; a switch would be confirmed at step 12
    for _ in range(6):
        _step(state, optimizer)
    assert auto.next_decision > 10**9  # interval 0: one round, then no more decisions
    assert len(auto.history) == (2 if auto.history[0]["trial"] else 1)


def test_each_decision_times_only_the_steps_since_the_last_one() -> None:
    state, optimizer, _ = _attached({"warmup_steps": 6, "interval": 6, "pin": 0.01})
    auto = state.auto
    assert auto is not None
    seen: list[int] = []
    auto.measure = lambda: seen.append(len(auto._intervals)) or Measurement(0.01, 0.0, float("inf"))  # type: ignore[func-returns-value]
    for _ in range(12):
        _step(state, optimizer)
    # 6 steps: 5 intervals, the first 2 untimed -> 3; then 6 more intervals, none skipped (no switch)
    assert seen == [3, 6] and state.method.compressor == TopK(density=0.01)


def test_compute_time_is_the_measured_step_minus_the_current_settings_cost() -> None:
    state, _, _ = _attached({"warmup_steps": 4, "trial_steps": 4, "interval": 4})
    auto = state.auto
    assert auto is not None
    measured = Measurement(step_s=0.2, latency_s=1e-4, link_bps=1e8)
    options, running, compute = auto.options_for(measured)
    assert running.density == 0.01 and running in options
    assert running.step_s == pytest.approx(0.2)  # the running setting predicts the measured step
    assert 0 < compute < 0.2
    assert {o.density for o in options} == {None, 0.01, 0.02, 0.05, 0.1}


def test_pin_applies_from_the_next_step_and_is_checkpointed() -> None:
    state, optimizer, _ = _attached({"warmup_steps": 4, "trial_steps": 4, "interval": 4})
    auto = state.auto
    assert auto is not None
    auto.measure = lambda: Measurement(step_s=0.01, latency_s=0.0, link_bps=float("inf"))
    auto.pin(0.05)
    assert state.method.compressor == TopK(density=0.05)
    for _ in range(4):
        _step(state, optimizer)
    assert auto.history[0]["reason"] == "pinned" and state.method.compressor == TopK(density=0.05)
    saved = state.state_dict()
    assert saved["auto_density"]["pinned"] == 0.05 and "density=0.05" in saved["method"]
    fresh, _, _ = _attached({"warmup_steps": 4, "trial_steps": 4, "interval": 4})
    fresh.load_state_dict(saved)
    assert fresh.method.compressor == TopK(density=0.05)
    assert fresh.auto is not None and fresh.auto.state_dict() == saved["auto_density"]
    with pytest.raises(ValueError, match=r"pin a density in \(0, 1\] or 'none'"):
        auto.pin(2.0)


def test_a_failed_load_leaves_the_density_as_it_was() -> None:
    state, _, _ = _attached({})
    saved = state.state_dict()
    saved["auto_density"]["density"] = 0.05  # a file of the same run at another density ...
    saved["method"] = GMCConfig(compressor="topk", density=0.05).build().describe()
    saved["shared"]["momentum"]["weight"] = torch.zeros(3)  # ... whose momentum is of another model
    with pytest.raises(ValueError, match="shape"):
        state.load_state_dict(saved)
    assert state.method.compressor == TopK(density=0.01)
    assert state.auto is not None and state.auto.density == 0.01 and state.auto.history == []
    saved["shared"]["momentum"]["weight"] = torch.zeros(16, 64)
    state.load_state_dict(saved)  # the whole file is right: now the saved density runs
    assert state.method.compressor == TopK(density=0.05) and state.auto.density == 0.05


def test_checkpoints_of_fixed_and_auto_density_are_told_apart() -> None:
    auto_state, _, _ = _attached({})
    model = nn.Linear(64, 16)
    fixed = GMCHookState.from_config(GMCConfig(compressor="topk", density=0.01))
    fixed.attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="written with a fixed density"):
        auto_state.load_state_dict(fixed.state_dict())


# ------------------------------------------------------------------------- Trainer and Fabric
def test_trainer_with_density_auto_logs_its_choice() -> None:
    module = _Module()
    trainer = L.Trainer(
        strategy=GMCStrategy(
            compressor="topk", density="auto", auto_density={"warmup_steps": 4, "interval": 4}
        ),
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _loader())
    metrics = trainer.callback_metrics
    assert float(metrics["gmc/auto_density"]) == 1.0  # one process: nothing to send, dense is fastest
    assert float(metrics["gmc/density"]) == 1.0
    auto = trainer.strategy.gmc_state.auto  # type: ignore[attr-defined]
    assert auto is not None and [d["step"] for d in auto.history] == [4]


def test_fabric_with_density_auto() -> None:
    fabric = L.Fabric(
        strategy=GMCFabricStrategy(compressor="rbgs", density="auto", auto_density={"pin": 0.02}),
        accelerator="cpu",
        devices=1,
    )
    fabric.launch()
    net = nn.Linear(32, 8)
    fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    strategy = fabric.strategy
    assert isinstance(strategy, GMCFabricStrategy)
    assert strategy.gmc_state.auto is not None and strategy.gmc_state.method.compressor.density == 0.02  # type: ignore[attr-defined]
