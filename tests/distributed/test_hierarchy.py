"""``hierarchy="node"`` through the strategies: the Trainer (GMCStrategy) and Fabric
(GMCFabricStrategy) runs of 2 nodes x 2 ranks.

Each starts one process per node with NODE_RANK set (``helpers.run_distributed``, through
``launch.launch_nodes``), and the strategy starts the node's second rank; each equals the simulator
with K = 2 workers fed each node's mean gradient (nothing of the small model is split across a node's
ranks, so the flat simulator is the reference). The plain-DDP launches of 2 x 2 and 2 x 3 ranks
against the hierarchical simulator are in ``tests/distributed/test_node_reducer.py``; the topology
checks in one process in ``tests/hook/test_hierarchy_topology.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from helpers import FABRIC_RUNNER, loss_fn, lr_at, make_dataset, make_model, rank_batch, run_distributed

from lightning_gmc import Simulator
from lightning_gmc.methods import GroupHyper

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
    results = run_distributed(tmp_path, cfg)  # one process per node, as a cluster starts it
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
    results = run_distributed(tmp_path, cfg, runner=FABRIC_RUNNER)
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
