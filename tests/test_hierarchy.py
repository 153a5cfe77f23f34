"""``hierarchy="node"`` through the strategies, and its topology checks (one process each).

The Trainer (GMCStrategy) and Fabric (GMCFabricStrategy) runs start one process per node with
NODE_RANK set, and the strategy starts the node's second rank; each equals the simulator with K = 2
workers fed each node's mean gradient (nothing of the small model is split across a node's ranks,
so the flat simulator is the reference). The plain-DDP launches of 2 x 2 and 2 x 3 ranks against the
hierarchical simulator are in tests/distributed/test_node_reducer.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import REPO, RUNNER, _free_port, loss_fn, lr_at, make_dataset, make_model, rank_batch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gmc import GMCConfig, GMCFabricStrategy, GMCHookState, GMCStrategy, Simulator
from lightning_gmc._adapter import check_node_layout
from lightning_gmc.hook.hierarchy import check_topology
from lightning_gmc.methods import GroupHyper

FABRIC_RUNNER = Path(__file__).resolve().parent / "fabric_runner.py"
NODES, PER_NODE = 2, 2
CFG: dict[str, Any] = {
    "model": "small",
    "lr": 0.1,
    "batch_size": 8,
    "num_samples": 64,
    "bucket_cap_mb": 0.001,
}
# The small model (998 elements, one DDP bucket) under the default shard plan with G = 2: nothing is
# split (every parameter is below 2 x 2048 elements); 0.weight (768) goes to local rank 0, then the
# rest to the less loaded rank 1: shards of 768 and 230 elements. Per step each rank sends a
# reduce-scatter of 768 fp32 values and an all-gather of 768 + 1 (the status) inside the node.
SHARD_CHUNK = 768
INTRA_PER_STEP = (PER_NODE - 1) * 4 * (2 * SHARD_CHUNK + 1)


def _replay(case: dict[str, Any], schedule: str, steps: int) -> list[dict[str, Any]]:
    """The run in the simulator with one worker per node, fed the node's mean gradient."""
    torch.set_num_threads(1)
    model = make_model(CFG["model"], 0)
    data = make_dataset(CFG["num_samples"], 1)
    sim = Simulator(
        dict(model.named_parameters()), num_workers=NODES, momentum=0.9, weight_decay=1e-3, **case
    )
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = []
    for step in range(steps):
        lr = lr_at(step, CFG["lr"], schedule, steps)
        # The detached point as the hook's swap forms it (w.add_(e, alpha=-s)); Simulator.gradient_points
        # computes w - s * e, which can round differently in the last bit.
        scale = sim.method.detach_scale(GroupHyper(lr, lr, 0.9, 1e-3))
        points = [
            {
                name: w[name].clone().add_(r.view_as(w[name]), alpha=-scale)
                for name, r in sim.residual(n).items()
            }
            for n in range(NODES)
        ]
        node_grads = []
        for node in range(NODES):
            local = []
            for local_rank in range(PER_NODE):
                rank = node * PER_NODE + local_rank
                model.zero_grad()
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        p.copy_(points[node][name])
                x, y = rank_batch(data, rank, NODES * PER_NODE, CFG["batch_size"], step)
                loss_fn(model, x, y).backward()
                local.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
            node_grads.append({name: (local[0][name] + local[1][name]) / PER_NODE for name in w})
        direction = sim.step(node_grads, points, lr)[0]
        w = {name: w[name].clone().add_(direction[name], alpha=-lr) for name in w}
        history.append(
            {
                "params": w,
                "residual": [sim.residual(node) for node in range(NODES)],
                "bytes_sent": sim.stats.take_step()["bytes_sent"],
            }
        )
    return history


def _node_residual(ranks: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A node's residual from its ranks' states: each rank's state holds the parameters it owns (the
    small model's are all whole, so the shards are disjoint sets of parameters)."""
    merged: dict[str, torch.Tensor] = {}
    for result in ranks:
        owned = result["gmc_state"]["local"]["residual"]
        assert not merged.keys() & owned.keys()
        merged.update(owned)
    return merged


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def _clean_env() -> dict[str, str]:
    launcher = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )
    return env


def _launch_nodes(runner: Path, tmp_path: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Start ``runner`` once per node with NODE_RANK set (as a cluster does; Lightning or Fabric
    starts each node's other ranks) and return every rank's result."""
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "out_dir": str(tmp_path)}))
    env = _clean_env()
    procs = [
        subprocess.Popen(
            [sys.executable, str(runner), str(tmp_path / "config.json")],
            cwd=tmp_path,
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(NODES)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(NODES * PER_NODE)]


def test_lightning_two_nodes_of_two_devices(tmp_path: Path) -> None:
    """GMCStrategy(hierarchy="node") with Trainer(num_nodes=2, devices=2): one process per node started
    from the environment (NODE_RANK, as a cluster does), Lightning starts each node's second rank. The
    topology comes from the Trainer; the run equals the simulator with one worker per node."""
    steps = 3
    case = {"compressor": "topk", "density": 0.05}
    cfg = {
        "model": "small",
        "lr": CFG["lr"],
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "batch_size": CFG["batch_size"],
        "num_samples": CFG["num_samples"],
        "max_steps": steps,
        "devices": PER_NODE,
        "num_nodes": NODES,
        "bucket_cap_mb": CFG["bucket_cap_mb"],
        "strategy_kwargs": {"hierarchy": "node", **case},
    }
    results = _launch_nodes(RUNNER, tmp_path, cfg)
    expected = _replay(case, schedule="constant", steps=steps)[-1]
    for rank, result in enumerate(results):
        assert result["global_step"] == steps
        assert _equal(result["params"], expected["params"]), f"rank {rank}"
    for node in range(NODES):
        residual = _node_residual(results[node * PER_NODE : (node + 1) * PER_NODE])
        assert _equal({k.removeprefix("net."): v for k, v in residual.items()}, expected["residual"][node])
    logged = [r for r in results[0]["metrics"] if "gmc/bytes_sent_intra" in r]
    assert len(logged) == steps
    assert all(r["gmc/bytes_sent_intra"] == INTRA_PER_STEP for r in logged)
    assert all(0 < r["gmc/bytes_sent_inter"] < expected["bytes_sent"] for r in logged)


def test_fabric_two_nodes_of_two_devices(tmp_path: Path) -> None:
    """GMCFabricStrategy(hierarchy="node") with Fabric(num_nodes=2, devices=2), started as the Trainer
    run above: the topology comes from Fabric, and a GMC+ loop (gradients at each node's detached
    point) equals the simulator with one worker per node."""
    steps = 3
    case = {"compressor": "topk", "density": 0.05, "detach": 0.5}
    cfg = {
        "model": "small",
        "lr": CFG["lr"],
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "batch_size": CFG["batch_size"],
        "num_samples": CFG["num_samples"],
        "steps": steps,
        "devices": PER_NODE,
        "num_nodes": NODES,
        "strategy_kwargs": {"hierarchy": "node", "bucket_cap_mb": CFG["bucket_cap_mb"], **case},
    }
    results = _launch_nodes(FABRIC_RUNNER, tmp_path, cfg)
    expected = _replay(case, schedule="constant", steps=steps)[-1]
    for rank, result in enumerate(results):
        assert result["topology"] == {"hierarchy": "node", "num_nodes": NODES, "ranks_per_node": PER_NODE}
        assert result["gmc_step"] == steps
        assert _equal(result["params"], expected["params"]), f"rank {rank}"
    for node in range(NODES):
        residual = _node_residual(results[node * PER_NODE : (node + 1) * PER_NODE])
        assert _equal(residual, expected["residual"][node]), f"node {node}"
    metrics = results[0]["metrics"]  # the last step's
    # GMC+ also gathers the residual for the detached point: the largest shard, from the other rank.
    assert metrics["gmc/bytes_sent_intra"] == INTRA_PER_STEP + (PER_NODE - 1) * 4 * SHARD_CHUNK
    assert 0 < metrics["gmc/bytes_sent_inter"] < expected["bytes_sent"]
