"""Restarting the local state (a resume on another number of workers or another topology) keeps
every method's invariants between local and shared buffers.

EF21 keeps ``h = mean_k h_k`` (its aggregate and the workers' estimates): a reset that zeroed the
estimates and kept the aggregate left ``h - mean_k h_k = h`` in the optimizer's gradient for good.
Checked against that formula (the mean of the estimates computed here, in float64), in the simulator
(several workers, several steps after the reset) and through the hook's checkpoint path (a 2-worker
file resumed on one rank, by a world-size change and by a topology change). Every other method
declares no such invariant; their reset zeroes the local buffers and keeps the shared ones.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_gmc import METHODS, GMCConfig, GMCHookState, Simulator, gmc_hook
from lightning_gmc.hook import codec
from lightning_gmc.hook.binding import OptimizerBinding, StepClock
from lightning_gmc.methods import Method, WorkerState
from lightning_gmc.transport import CommStats

SHAPES = {"w": (6, 5), "b": (5,)}


def _gradients(gen: torch.Generator, workers: int) -> list[dict[str, torch.Tensor]]:
    # worker k's gradients are centred on k: the estimates differ from the aggregate
    return [{n: torch.randn(s, generator=gen) + k for n, s in SHAPES.items()} for k in range(workers)]


def _relative_gap(workers: list[WorkerState], shared: str, local: str) -> float:
    """max over parameters of ||h - mean_k h_k|| / max(||h||, max_k ||h_k||), in float64."""
    worst = 0.0
    for index in range(len(workers[0].table)):
        kept = workers[0].tensors[shared][index].double()
        parts = [w.tensors[local][index].double() for w in workers]
        mean = sum(parts) / len(parts)
        scale = max(float(kept.norm()), *(float(p.norm()) for p in parts))
        worst = max(worst, float((kept - mean).norm()) / scale)
    return worst


def _restart_local(method: Method, worker: WorkerState, shared: dict[str, dict[str, torch.Tensor]]) -> None:
    """What a resume with ``on_world_size_change="reset_residuals"`` does to one worker: the saved
    shared buffers, the local ones restarted (the hook's load path, ``load_local=False``)."""
    stats = CommStats()
    rank_state = {
        "format": codec.STATE_FORMAT,
        "method": method.describe(),
        "step": 5,
        "last_lrs": [0.1],
        "shared": shared,
        "local": {},
        "stats": stats.state_dict(),
    }
    codec.load_rank_state(
        rank_state, method, StepClock(OptimizerBinding(method)), worker, stats, load_local=False
    )


def _train(sim: Simulator, steps: int, gen: torch.Generator) -> None:
    points = sim.gradient_points({n: torch.zeros(s) for n, s in SHAPES.items()}, 0.1)
    for _ in range(steps):
        sim.step(_gradients(gen, sim.num_workers), points, 0.1)


@pytest.mark.parametrize("compressor", ["topk", "rbgs", "qsgd"])
def test_ef21_restarted_on_fewer_workers_keeps_the_aggregate_the_mean_estimate(compressor: str) -> None:
    gen = torch.Generator().manual_seed(0)
    before = Simulator(SHAPES, 4, method="ef21", compressor=compressor, density=0.2)
    _train(before, 5, gen)
    assert _relative_gap(before.workers, "aggregate", "estimate") < 1e-6
    saved = before.workers[0].state_dict("shared")

    # resumed on 2 workers: the shared aggregate is kept, the local estimates restart
    after = Simulator(SHAPES, 2, method="ef21", compressor=compressor, density=0.2)
    for worker in after.workers:
        _restart_local(after.method, worker, saved)
    for worker in after.workers:
        for index, name in enumerate(after.table.names):
            kept = saved["aggregate"][name].reshape(-1)
            assert torch.equal(worker.tensors["aggregate"][index], kept), name  # the estimate is kept
            assert torch.equal(worker.tensors["estimate"][index], kept), name  # h_k = h
    for _ in range(6):  # and it stays the mean as training goes on
        _train(after, 1, gen)
        assert _relative_gap(after.workers, "aggregate", "estimate") < 1e-6


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_its_invariants_and_reset_keeps_them(name: str) -> None:
    sim = Simulator(SHAPES, 2, method=name, density=0.5)
    method = sim.method
    for shared, local in method.mean_of_local.items():
        assert method.buffers[shared] == "shared" and method.buffers[local] == "local", (shared, local)
    _train(sim, 3, torch.Generator().manual_seed(1))
    kept = [worker.state_dict("shared") for worker in sim.workers]
    for worker, shared in zip(sim.workers, kept, strict=True):
        _restart_local(method, worker, shared)
    tied = set(method.mean_of_local.values())
    for worker, shared_before in zip(sim.workers, kept, strict=True):
        assert _equal_state(worker.state_dict("shared"), shared_before)  # shared buffers kept
        for buffer, by_name in worker.state_dict("local").items():
            if buffer not in tied:
                assert all(torch.count_nonzero(t) == 0 for t in by_name.values()), buffer
    for shared, local in method.mean_of_local.items():
        assert _relative_gap(sim.workers, shared, local) == 0.0
    assert (name == "ef21") == bool(method.mean_of_local)  # the audit: EF21 is the only one


def _equal_state(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


# ----------------------------------------------------------------------- through the hook
def _two_worker_ef21_block(method_label: str) -> dict[str, Any]:
    """A consistent gathered EF21 block of 2 workers (from the simulator), named like the model below."""
    model = nn.Linear(5, 6)
    sim = Simulator(dict(model.named_parameters()), 2, method="ef21", compressor="topk", density=0.25)
    gen = torch.Generator().manual_seed(3)
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(4):
        grads = [
            {n: torch.randn(p.shape, generator=gen) + k for n, p in model.named_parameters()}
            for k in range(2)
        ]
        sim.step(grads, [zero, zero], 0.1)
    return {
        "format": 1,
        "method": method_label,
        "step": 4,
        "last_lrs": [0.1],
        "shared": sim.workers[0].state_dict("shared"),
        "stats": {
            "bytes_sent_total": 0.0,
            "dense_bytes_total": 0.0,
            "rcc_bits_total": 0.0,
            "rcc_dense_bits_total": 0.0,
        },
        "world_size": 2,
        "per_rank_local": [{"buffers": worker.state_dict("local")} for worker in sim.workers],
        "topology": {"hierarchy": "flat"},
    }


@pytest.mark.usefixtures("single_rank_group")
@pytest.mark.parametrize("change", ["world_size", "topology"])
def test_ef21_resumed_on_one_rank_through_the_hook_keeps_the_invariant(change: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = GMCHookState.from_config(
        GMCConfig(method="ef21", compressor="topk", density=0.25, on_world_size_change="reset_residuals")
    )
    state.attach(model, optimizer)
    block = _two_worker_ef21_block(state.method.describe())
    if change == "topology":  # written as 2 nodes of 1 rank (hierarchy="node"), resumed flat
        block["topology"] = {"hierarchy": "node", "num_nodes": 2, "ranks_per_node": 1}
    state.load_state_dict(block)
    assert state.step == 4
    loaded = state.state_dict()
    for name, kept in block["shared"]["aggregate"].items():
        assert torch.equal(loaded["shared"]["aggregate"][name], kept), name
        assert torch.equal(loaded["local"]["estimate"][name], kept), name  # h_0 = h: one worker's mean
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(state, gmc_hook)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        ddp(torch.randn(8, 5, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        after = state.state_dict()
        for name in after["shared"]["aggregate"]:
            assert torch.equal(after["local"]["estimate"][name], after["shared"]["aggregate"][name]), name
