"""``hierarchy="node"``: 2 nodes x 2 ranks (4 gloo processes, plain DDP + the hook) against the
simulator with K = 2 workers fed each node's mean gradient, exactly (the topology checks in one
process: ``tests/hook/test_hierarchy_topology.py``).

The ranks are started the way torchrun starts them (``launch.launch_ranks``: RANK, WORLD_SIZE,
LOCAL_RANK and NODE_RANK in the environment); ranks 0, 1 form node 0 and ranks 2, 3 node 1. One
launch runs every case, each interrupted by a checkpoint and resumed in the same processes. The
Trainer (GMCStrategy) and Fabric (GMCFabricStrategy) runs start one process per node with NODE_RANK
set, and the strategy starts the node's second rank.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FABRIC_RUNNER, loss_fn, lr_at, make_dataset, make_model, rank_batch, run_distributed
from launch import TESTS, launch_ranks

from lightning_gmc import Simulator
from lightning_gmc.methods import GroupHyper
from lightning_gmc.transport import ring_allreduce_bytes

SCRIPT = TESTS / "hierarchy_script.py"
NODES, PER_NODE = 2, 2
CFG: dict[str, Any] = {
    "model": "small",
    "lr": 0.1,
    "steps": 4,
    "checkpoint_at": 2,
    "batch_size": 8,
    "num_samples": 64,
    "ranks_per_node": PER_NODE,
    # each rank first tries a copy of the checkpoint with rank 1's residual of the wrong shape
    "corrupt_entry": 1,
    # two buckets of the small model: (Linear 2) and (Linear 1), so ownership splits across buckets
    "bucket_cap_mb": 0.001,
    "cases": {
        "gmc_topk": {"compressor": "topk", "density": 0.05},
        "gmc_plus_rbgs": {"compressor": "rbgs", "density": 0.05, "detach": 0.5, "seed": 3},
        # the leader's support broadcast runs over the inter-node group (leader = step mod nodes)
        "gmc_topk_shared_bf16": {"compressor": "topk_shared", "density": 0.05, "wire_dtype": "bf16"},
    },
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("hierarchy")
    cfg = {**CFG, "out_dir": str(out_dir)}
    (out_dir / "config.json").write_text(json.dumps(cfg))
    world = NODES * PER_NODE
    launch_ranks([SCRIPT, out_dir / "config.json"], world, ranks_per_node=PER_NODE, timeout=180)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _replay(
    case: dict[str, Any], schedule: str = "cosine", steps: int = CFG["steps"]
) -> list[dict[str, Any]]:
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


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", list(CFG["cases"]))
def test_two_nodes_of_two_ranks_equal_the_simulator_with_one_worker_per_node(
    results: list[dict[str, Any]], case: str
) -> None:
    expected = _replay(CFG["cases"][case])
    for rank, result in enumerate(results):
        node = rank // PER_NODE
        for step, (got, want) in enumerate(zip(result[case]["run"], expected, strict=True)):
            assert _equal(got["params"], want["params"]), f"rank {rank} step {step}: parameters"
            residual = got["state"]["local"]["residual"]
            assert _equal(residual, want["residual"][node]), f"rank {rank} step {step}: node residual"


@pytest.mark.parametrize("case", list(CFG["cases"]))
def test_replicas_are_bit_identical_and_resume_is_bitwise(results: list[dict[str, Any]], case: str) -> None:
    def bits(params: dict[str, torch.Tensor]) -> list[bytes]:
        return [t.numpy().tobytes() for t in params.values()]

    reference = results[0][case]["run"]
    for rank, result in enumerate(results):
        run, resumed = result[case]["run"], result[case]["resumed"]
        for step, entry in enumerate(run):
            assert bits(entry["params"]) == bits(reference[step]["params"]), f"rank {rank} step {step}"
        tail = run[CFG["checkpoint_at"] :]
        assert len(resumed) == len(tail)
        for got, want in zip(resumed, tail, strict=True):
            assert bits(got["params"]) == bits(want["params"])
            for scope in ("local", "shared"):
                for buffer, by_name in want["state"][scope].items():
                    assert bits(got["state"][scope][buffer]) == bits(by_name), (rank, scope, buffer)
            assert got["metrics"]["bytes_sent_total"] == want["metrics"]["bytes_sent_total"]


def test_a_bad_entry_of_one_rank_fails_on_every_rank_alike(results: list[dict[str, Any]]) -> None:
    """Every rank reads every rank's entry of the gathered file, so rank 1's bad residual stops all
    four ranks at load time with one message naming the field (before, rank 1 alone failed and the
    others trained on); the good file then still resumes bit for bit (the test above)."""
    for case in CFG["cases"]:
        errors = [result[case]["corrupt_error"] for result in results]
        assert errors[0] is not None and errors == [errors[0]] * len(results), errors
        assert re.search(r"per_rank_local\[1\]\.buffers\['residual'\]\['[\w.]+'\] has shape", errors[0])


@pytest.mark.parametrize("case", list(CFG["cases"]))
def test_inter_and_intra_node_bytes(results: list[dict[str, Any]], case: str) -> None:
    """Inter-node: a node's local ranks together send what one worker of the K = 2 simulator sends
    (each carries the parameters it owns). Intra-node: the mean gradient, then the update and the
    method's two buffers (residual, momentum), each a ring all-reduce of the model over 2 ranks."""
    expected = _replay(CFG["cases"][case])
    numel = sum(p.numel() for p in make_model(CFG["model"], 0).parameters())
    intra = ring_allreduce_bytes(4 * numel, PER_NODE) * (1 + 1 + 2)
    for node in range(NODES):
        ranks = results[node * PER_NODE : (node + 1) * PER_NODE]
        for step, want in enumerate(expected):
            metrics = [r[case]["run"][step]["metrics"] for r in ranks]
            assert all(m["bytes_sent_inter"] == m["bytes_sent"] for m in metrics)
            assert sum(m["bytes_sent_inter"] for m in metrics) == pytest.approx(want["bytes_sent"])
            assert all(m["bytes_sent_inter"] > 0 for m in metrics), "both local ranks own parameters"
            assert sum(m["bytes_sent_intra"] for m in metrics) == pytest.approx(PER_NODE * intra)


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
        residual = {k.removeprefix("net."): v for k, v in result["gmc_state"]["local"]["residual"].items()}
        assert _equal(residual, expected["residual"][rank // PER_NODE]), f"rank {rank}"
    logged = [r for r in results[0]["metrics"] if "gmc/bytes_sent_intra" in r]
    assert len(logged) == steps
    numel = sum(p.numel() for p in make_model("small").parameters())
    assert all(r["gmc/bytes_sent_intra"] == ring_allreduce_bytes(4 * numel, PER_NODE) * 4 for r in logged)
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
        residual = result["gmc_state"]["local"]["residual"]
        assert _equal(residual, expected["residual"][rank // PER_NODE]), f"rank {rank}"
    numel = sum(p.numel() for p in make_model("small").parameters())
    metrics = results[0]["metrics"]  # the last step's
    assert metrics["gmc/bytes_sent_intra"] == ring_allreduce_bytes(4 * numel, PER_NODE) * 4
    assert 0 < metrics["gmc/bytes_sent_inter"] < expected["bytes_sent"]
