"""``fabric.load(path)`` without objects returns the raw checkpoint and restores nothing; on a file
written with ``GMCFabricStrategy`` it warns that the GMC state (step, residuals, momentum) was not
restored and names the way that does restore it. Before, training restarted from step 0 with zero
residual and momentum, silently."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import make_model

from lightning_gmc import GMCFabricStrategy
from lightning_gmc._adapter import CHECKPOINT_KEY


def _fabric() -> tuple[L.Fabric, torch.nn.Module, torch.optim.Optimizer]:
    fabric = L.Fabric(
        strategy=GMCFabricStrategy(compressor="topk", density=0.5), accelerator="cpu", devices=1
    )
    fabric.launch()
    model = make_model("small")
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    return fabric, model, optimizer


def test_a_raw_load_of_a_gmc_checkpoint_warns_and_the_objects_load_restores(tmp_path: Path) -> None:
    fabric, model, optimizer = _fabric()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        fabric.backward(model(torch.randn(4, 24, generator=gen)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path / "gmc.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer})
    strategy = fabric.strategy
    assert isinstance(strategy, GMCFabricStrategy)

    resumed, model2, optimizer2 = _fabric()
    with pytest.warns(
        UserWarning, match=r"GMC state \(step 2, .*\) was NOT restored.*fabric\.load\(path, \{'model'"
    ):
        raw = resumed.load(path)
    assert CHECKPOINT_KEY in raw and resumed.strategy.gmc_state.step == 0  # type: ignore[attr-defined]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported way restores the state, without a warning
        resumed.load(path, {"model": model2, "optimizer": optimizer2})
    gmc_state = resumed.strategy.gmc_state  # type: ignore[attr-defined]
    assert gmc_state.step == 2
    saved = strategy.gmc_state.state_dict()
    for name, tensor in saved["shared"]["momentum"].items():
        assert torch.equal(gmc_state.state_dict()["shared"]["momentum"][name], tensor), name


def test_a_raw_load_of_a_checkpoint_without_gmc_state_is_quiet(tmp_path: Path) -> None:
    fabric, model, _ = _fabric()
    path = tmp_path / "plain.ckpt"
    torch.save({"model": model.state_dict()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "model" in fabric.load(path)
