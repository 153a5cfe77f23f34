"""What a user sees from GMCStrategy: the run summary line, progress-bar metrics, the gradient-clipping
policy, command-line overrides of single strategy fields and the signature both strategies show
(one process, CPU)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from launch import REPO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gmc import GMCConfig, GMCFabricStrategy, GMCHookState, GMCStrategy
from lightning_gmc.methods import GMC


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _ClipsItself(_Module):
    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, **kwargs: Any
    ) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=0.5)


def _trainer(strategy: Any, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return L.Trainer(strategy=strategy, **options)


def _loader() -> DataLoader:
    return DataLoader(
        TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0))), batch_size=4
    )


@pytest.mark.parametrize("method", ["gmc", "dmsgd"])
def test_trainer_gradient_clipping_is_rejected_before_training(method: str) -> None:
    # Lightning clips after the hook wrote the method's direction into .grad: rejected, not applied.
    module = _Module()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = _trainer(GMCStrategy(method=method), gradient_clip_val=1.0)
    with pytest.raises(ValueError, match=r"gradient_clip_val=1\.0.*update direction.*DDPStrategy"):
        trainer.fit(module, _loader())
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), before[name]), "no step may run before the rejection"


def test_module_that_clips_in_configure_gradient_clipping_is_rejected() -> None:
    with pytest.raises(ValueError, match="_ClipsItself.configure_gradient_clipping"):
        _trainer(GMCStrategy()).fit(_ClipsItself(), _loader())


def test_clipping_is_allowed_when_the_optimizer_applies_the_update() -> None:
    # A method that leaves the step to the user's optimizer hands it the averaged gradient, so
    # Lightning's clipping acts as under DDP: not rejected.
    class _KeepsOptimizer(GMC):
        takes_over_optimizer = False

    strategy = GMCStrategy()
    strategy.gmc_state = GMCHookState(
        _KeepsOptimizer(GMCConfig(compressor="topk", density=0.5).build().compressor)
    )
    strategy.gmc_method = strategy.gmc_state.method
    trainer = _trainer(strategy, gradient_clip_val=1.0)
    trainer.fit(_Module(), _loader())
    assert trainer.global_step == 2


def test_run_summary_line_names_the_effective_settings(caplog: pytest.LogCaptureFixture) -> None:
    strategy = GMCStrategy(compressor="rbgs", density=0.05, detach=0.5)
    with caplog.at_level(logging.INFO):
        _trainer(strategy).fit(_Module(), _loader())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning_gmc: method=")]
    assert len(lines) == 1, lines
    line = lines[0]
    expected_fields = (
        "method=gmc",
        "compressor=RandomBlock(density=0.05, wire_dtype='fp32')",
        "density=0.05",
        "detach=0.5",
        "hierarchy=flat",
        "wire_dtype=fp32",
    )
    for expected in expected_fields:
        assert expected in line, line
    # every configuration field is reported (a field added later appears without touching this test)
    for field in dataclasses.fields(GMCConfig):
        if field.name != "compressor_options":
            assert f"{field.name}=" in line, (field.name, line)
    assert "momentum per group=[0.9]" in line


def test_run_summary_resolves_method_defaults(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _trainer(GMCStrategy(method="dmsgd")).fit(_Module(), _loader())
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning_gmc: method="))
    for expected in ("method=dmsgd", "compressor=Identity(wire_dtype='fp32')", "detach=n/a"):
        assert expected in line, line


def test_progress_bar_shows_rcc_and_bytes_unless_opted_out() -> None:
    trainer = _trainer(GMCStrategy(compressor="topk", density=0.5), enable_progress_bar=True)
    trainer.fit(_Module(), _loader())
    assert {"gmc/rcc", "gmc/bytes_sent"} <= set(trainer.progress_bar_metrics)
    quiet = _trainer(GMCStrategy(compressor="topk", density=0.5, progress_bar_metrics=False))
    quiet.fit(_Module(), _loader())
    assert not any(key.startswith("gmc/") for key in quiet.progress_bar_metrics)
    assert "gmc/rcc" in quiet.callback_metrics  # still logged


_SUMMARY_SCRIPT = """
import lightning as L, torch
from torch.utils.data import DataLoader, TensorDataset
from lightning_gmc import GMCStrategy

class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

trainer = L.Trainer(strategy="gmc_plus", accelerator="cpu", devices=1, max_steps=1, logger=False,
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
trainer.fit(M(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
"""


def test_run_summary_is_printed_without_logging_configuration(tmp_path: Path) -> None:
    # A registered name replaces every strategy setting: the printed line shows what runs.
    proc = subprocess.run(
        [sys.executable, "-c", _SUMMARY_SCRIPT],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lightning_gmc: method=")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for expected in ("compressor=RandomBlock(density=0.01, wire_dtype='fp32')", "detach=0.5"):
        assert expected in lines[0], lines[0]


@pytest.mark.parametrize("strategy", [GMCStrategy, GMCFabricStrategy])
def test_every_config_field_is_a_typed_documented_argument(strategy: type) -> None:
    # The strategies build their GMCConfig from their arguments by name; users and LightningCLI read
    # the signature and the docstring, so each field must be an explicit, typed, documented argument
    # with the config's default (None for the option dicts).
    parameters = inspect.signature(strategy.__init__).parameters
    doc = strategy.__doc__ or ""
    for field in dataclasses.fields(GMCConfig):
        parameter = parameters[field.name]
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, field.name
        assert parameter.annotation is not inspect.Parameter.empty, field.name
        default = None if field.default is dataclasses.MISSING else field.default
        assert parameter.default == default, field.name
        assert f"\n        {field.name}: " in doc, field.name
    assert "{gmc_arguments}" not in doc
    config = strategy(method_options=None, compressor_options=None, hierarchy="node").gmc_config
    assert (config.method_options, config.compressor_options, config.hierarchy) == ({}, {}, "node")
