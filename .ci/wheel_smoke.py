"""Smoke test of the installed wheel, run by .ci/wheel_check.sh with the wheel's own venv (not in pytest).

It checks what a user who ran ``pip install lightning-gmc`` gets: the package imports from the venv,
not from the repository; its declared dependencies are installed at versions that satisfy the
wheel's metadata (that they are exactly what the package imports: tests/tools/test_dependencies.py);
the wheel carries the LICENSE; the console script answers; and a 2-process CPU fit with
``GMCStrategy`` trains (generated data, a few steps), with the GMC metrics logged.

    python .ci/wheel_smoke.py REPO_ROOT
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import torch
from lightning import LightningModule, Trainer
from packaging.requirements import Requirement
from torch.utils.data import DataLoader, TensorDataset

import lightning_gmc
from lightning_gmc import GMCStrategy

STEPS = 6


class Regression(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _check_installation(repo: Path) -> None:
    where = Path(lightning_gmc.__file__).resolve()
    assert repo not in where.parents, f"lightning_gmc was imported from the repository: {where}"
    dist = importlib.metadata.distribution("lightning-gmc")
    assert dist.version == lightning_gmc.__version__, (dist.version, lightning_gmc.__version__)
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement (examples, dev)
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (line, installed)
    license_files = [f for f in dist.files or [] if f.name == "LICENSE"]
    assert license_files and "Apache License" in license_files[0].read_text(), "the wheel has no LICENSE"


def _check_console_script() -> None:
    script = Path(sys.executable).with_name("lightning-gmc")
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "not in the installed package" in shown, shown
    # run from a folder without the repository: no examples to find
    demo = subprocess.run([script, "demo"], capture_output=True, text=True, cwd="/", check=False)
    assert demo.returncode == 2 and "git clone" in demo.stderr, demo.stderr


def _fit() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    trainer = Trainer(
        strategy=GMCStrategy(compressor="topk_approx", density=0.1),
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), DataLoader(TensorDataset(x, y), batch_size=16))
    assert trainer.global_step == STEPS, trainer.global_step
    metrics = trainer.callback_metrics
    assert float(metrics["gmc/bytes_sent"]) > 0 and 0 < float(metrics["gmc/rcc"]) < 1, dict(metrics)
    if trainer.global_rank == 0:
        where = Path(lightning_gmc.__file__).parent
        print(
            f"wheel smoke: lightning_gmc {lightning_gmc.__version__} from {where}, "
            f"{trainer.world_size} CPU processes, {trainer.global_step} steps, "
            f"gmc/bytes_sent={float(metrics['gmc/bytes_sent']):.0f} per step, ok"
        )


if __name__ == "__main__":
    repository = Path(sys.argv[1]).resolve()
    _check_installation(repository)
    if "LOCAL_RANK" not in os.environ:  # the launching process; the rank it starts skips this
        _check_console_script()
    _fit()
