"""GMCFabricStrategy in one process: the registered names and the clipping policy (the Fabric loop on 2
gloo ranks: ``tests/distributed/test_fabric_distributed.py``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import make_model

from lightning_gmc import METHODS, GMCFabricStrategy


def test_registered_fabric_names() -> None:
    fabric = L.Fabric(strategy="gmc_plus", accelerator="cpu", devices=2)
    assert isinstance(fabric.strategy, GMCFabricStrategy)
    assert fabric.strategy.gmc_state.method.compressor.name == "rbgs"
    assert fabric.strategy.gmc_config.detach == 0.5
    for name in METHODS:
        assert L.Fabric(strategy=name, accelerator="cpu", devices=2).strategy.gmc_config.method == name


def test_fabric_clip_gradients_is_rejected_and_metrics_need_no_group() -> None:
    fabric = L.Fabric(
        strategy=GMCFabricStrategy(compressor="topk", density=0.5), accelerator="cpu", devices=1
    )
    fabric.launch()
    model = make_model("small")
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    fabric.backward(model(torch.randn(4, 24)).pow(2).mean())
    with pytest.raises(ValueError, match=r"fabric.clip_gradients\(max_norm=1.0\).*update direction"):
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
    optimizer.step()
    metrics = fabric.strategy.gmc_metrics()
    assert metrics["gmc/bytes_sent_sum_ranks"] == metrics["gmc/bytes_sent"]
