"""Entry point of the Fabric tests: ``python fabric_runner.py config.json`` (Fabric launches a node's
other ranks by re-running this script; ``devices`` per node, default 2, and ``num_nodes``, default 1).
A plain Fabric loop with ``GMCFabricStrategy``: each rank reads the batches ``helpers.rank_batch``
describes, optionally saves a checkpoint after ``save_at`` steps or resumes from ``resume_from``, and
writes ``rank{r}.pt`` with its parameters, GMC state and metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from helpers import loss_fn, make_dataset, make_model, rank_batch

from lightning_gmc import GMCFabricStrategy


def main() -> None:
    cfg: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    strategy = GMCFabricStrategy(**cfg["strategy_kwargs"])
    # num_nodes > 1: one process per node is started with NODE_RANK set (tests/test_hierarchy.py)
    fabric = L.Fabric(
        accelerator="cpu", devices=cfg.get("devices", 2), num_nodes=cfg.get("num_nodes", 1), strategy=strategy
    )
    fabric.launch()
    model = make_model(cfg.get("model", "small"), cfg.get("model_seed", 0))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    model, optimizer = fabric.setup(model, optimizer)
    start = 0
    if cfg.get("resume_from"):
        state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
        fabric.load(cfg["resume_from"], state)
        start = state["step"]
    data = make_dataset(cfg.get("num_samples", 256), cfg.get("data_seed", 1))
    rank, world = fabric.global_rank, fabric.world_size
    for step in range(start, cfg["steps"]):
        x, y = rank_batch(data, rank, world, cfg["batch_size"], step)
        loss = loss_fn(model, x, y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == cfg.get("save_at"):
            fabric.save(cfg["save_path"], {"model": model, "optimizer": optimizer, "step": step + 1})
    result = {
        "rank": rank,
        "params": {name: p.detach().clone() for name, p in model.module.named_parameters()},
        "gmc_state": strategy.gmc_state.state_dict(),
        "gmc_step": strategy.gmc_state.step,
        "topology": strategy.gmc_state.topology(),
        "metrics": strategy.gmc_metrics(),
        "optimizer_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    }
    torch.save(result, Path(cfg["out_dir"]) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
