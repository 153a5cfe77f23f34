"""One rank of the plain-DDP ``density="auto"`` runs (started by
tests/distributed/test_auto_density_distributed.py).

Ranks come from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Cases,
one launch:

* ``measured``: real decisions (every rank times its steps and the link on gloo);
* ``rank_dependent``: each rank's measurements say something else (rank 0 a 10 Mbit/s link, rank 1 a
  100 Gbit/s one): rank 0's decision must rule on every rank;
* ``forced``: densities pinned at given steps (``pins``), to compare with the simulator;
* ``resumed``: measurements fixed per decision step; the run is checkpointed at ``checkpoint_at``,
  rebuilt, resumed, and continued.

Writes ``rank{RANK}.pt`` with each case's per-step parameters, metrics and decision state.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import loss_fn, make_dataset, make_model, rank_batch
from torch.nn.parallel import DistributedDataParallel

from lightning_gmc import GMCConfig, GMCHookState, gmc_hook
from lightning_gmc.hook.auto_density import Measurement


def fixed_measurements(state: GMCHookState, by_decision: list[list[float]]) -> None:
    """Replace the controller's measurement by ``by_decision[i]`` = (step s, latency s, link bit/s) at
    its ``i``-th decision (counted from its restored history, so a resumed run continues the list)."""
    auto = state.auto
    assert auto is not None

    def measure() -> Measurement:
        step_s, latency_s, link_bps = by_decision[len(auto.history) % len(by_decision)]
        return Measurement(step_s, latency_s, link_bps)

    auto.measure = measure


def train(cfg: dict[str, Any], case: dict[str, Any], resume: dict[str, Any] | None) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model("small", 0)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=1e-3)
    state = GMCHookState.from_config(GMCConfig(**case["config"]))
    state.attach(model, optimizer)
    ddp.register_comm_hook(state, gmc_hook)
    assert state.auto is not None
    if "measurements" in case:
        fixed_measurements(state, case["measurements"])
    if "per_rank" in case:
        fixed_measurements(state, [case["per_rank"][rank]])
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        state.load_state_dict(resume["gmc"])
        start = int(resume["step"])
    data = make_dataset(cfg["num_samples"], 1)
    pins = {int(step): value for step, value in case.get("pins", {}).items()}
    history: list[dict[str, Any]] = []
    checkpoint = None
    for step in range(start, cfg["steps"]):
        if step in pins:
            state.auto.pin(pins[step])  # every rank, between the same two steps
        x, y = rank_batch(data, rank, world, cfg["batch_size"], step)
        with state.detached_point():
            loss_fn(ddp, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics = state.take_metrics()
        history.append(
            {
                "params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "metrics": metrics,
                "auto": state.auto.state_dict(),
                "compressor": repr(state.method.compressor),
            }
        )
        if resume is None and step + 1 == case.get("checkpoint_at"):
            checkpoint = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "gmc": state.gathered_state_dict(),
                "step": step + 1,
            }
    return {"history": history, "checkpoint": checkpoint}


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    for name, case in cfg["cases"].items():
        first = train(cfg, case, None)
        results[name] = {"run": first["history"]}
        if first["checkpoint"] is not None:
            shared = [first["checkpoint"]]  # every rank resumes from rank 0's file
            dist.broadcast_object_list(shared, src=0)
            results[name]["resumed"] = train(cfg, case, shared[0])["history"]
    torch.save(results, Path(cfg["out_dir"]) / f"rank{os.environ['RANK']}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
