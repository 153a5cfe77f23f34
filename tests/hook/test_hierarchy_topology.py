"""``hierarchy="node"`` in one process: the topology checks and their errors, as the hook,
GMCStrategy and GMCFabricStrategy run them (the shard plan: ``tests/methods/test_shards.py``; the
multi-process runs: ``tests/distributed/test_hierarchy.py`` and ``test_node_reducer.py``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from helpers import loss_fn, make_dataset, make_model
from torch.utils.data import DataLoader, TensorDataset

from lightning_gmc import GMCConfig, GMCFabricStrategy, GMCHookState, GMCStrategy
from lightning_gmc._adapter import check_node_layout
from lightning_gmc.hook.hierarchy import check_topology


def test_bad_topologies_are_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match="same number of ranks on every node"):
        check_topology(world_size=6, ranks_per_node=4)
    with pytest.raises(ValueError, match="same number of ranks on every node"):
        check_topology(world_size=8, ranks_per_node=2, num_nodes=3)
    with pytest.raises(ValueError, match="at least 2 nodes.*hierarchy='flat'"):
        check_topology(world_size=4, ranks_per_node=4)
    assert check_topology(world_size=8, ranks_per_node=4, num_nodes=2) == 2
    with pytest.raises(ValueError, match="'flat'.*'node'"):
        GMCConfig(hierarchy="nodes")  # type: ignore[arg-type]


def test_ranks_not_numbered_node_by_node_are_rejected_with_the_fix() -> None:
    # What every rank of GMCStrategy and GMCFabricStrategy checks, from all ranks' (node, local rank)
    # as the cluster environment reports them; here SLURM's cyclic distribution of 4 tasks on 2 nodes.
    cyclic = [(0, 0), (1, 0), (0, 1), (1, 1)]
    expected = (
        r"rank 1 is node 1, local rank 0 for Lightning, but node 0, local rank 1 by rank = node_rank \* "
        r"devices \+ local_rank; the launcher numbers ranks differently. Use hierarchy='flat'."
    )
    with pytest.raises(RuntimeError, match=expected):
        check_node_layout(cyclic, ranks_per_node=2)
    check_node_layout([(0, 0), (0, 1), (1, 0), (1, 1)], ranks_per_node=2)


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model("small")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return loss_fn(self.net, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_trainer_and_fabric_refuse_a_single_node_alike() -> None:
    """hierarchy='node' on one node of one device, in this process: both strategies stop before
    training with the same message (their topology checks are one function)."""
    trainer = L.Trainer(
        strategy=GMCStrategy(hierarchy="node"),
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="at least 2 nodes.*hierarchy='flat'") as from_trainer:
        trainer.fit(_Module(), DataLoader(TensorDataset(*make_dataset(8)), batch_size=4))
    fabric = L.Fabric(strategy=GMCFabricStrategy(hierarchy="node"), accelerator="cpu", devices=1)
    with pytest.raises(ValueError, match="at least 2 nodes.*hierarchy='flat'") as from_fabric:
        fabric.launch()
    assert str(from_fabric.value) == str(from_trainer.value)


def test_node_state_needs_its_groups_before_attach() -> None:
    model = make_model("small")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = GMCHookState.from_config(GMCConfig(hierarchy="node"))
    with pytest.raises(RuntimeError, match="set_node_groups"):
        state.attach(model, optimizer)
    flat = GMCHookState.from_config(GMCConfig())
    with pytest.raises(ValueError, match="hierarchy='node'"):
        flat.set_node_groups(None)  # type: ignore[arg-type]
