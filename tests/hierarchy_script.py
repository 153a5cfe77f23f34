"""One rank of a plain-DDP run with ``hierarchy="node"`` (started by tests/test_hierarchy.py).

Ranks come from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), the
way torchrun starts them; ``ranks_per_node`` consecutive ranks form a node. For every case of the
config: train ``steps`` steps, writing a checkpoint (model, optimizer, gathered GMC state) after
``checkpoint_at`` steps; then, in the same processes, build everything afresh, resume from that
checkpoint and train to ``steps`` again. With ``corrupt_entry: r``, each rank first tries to load a
copy of the checkpoint whose rank-``r`` residual has the wrong shape and records the error (every rank
must refuse it alike, and the good checkpoint must still resume bit for bit). Writes
``rank{RANK}.pt`` with both histories.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import loss_fn, lr_at, make_dataset, make_model, rank_batch
from torch.nn.parallel import DistributedDataParallel

from lightning_gmc import GMCConfig, GMCHookState, gmc_hook
from lightning_gmc.hook import build_node_groups


def train(
    cfg: dict[str, Any],
    case: dict[str, Any],
    resume: dict[str, Any] | None,
    corrupt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(cfg["model"], 0)
    ddp = DistributedDataParallel(model, bucket_cap_mb=cfg["bucket_cap_mb"])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=1e-3)
    config = GMCConfig(hierarchy="node", **case)
    state = GMCHookState.from_config(config)
    state.set_node_groups(build_node_groups(cfg["ranks_per_node"]))
    state.attach(model, optimizer)
    ddp.register_comm_hook(state, gmc_hook)
    start = 0
    corrupt_error = None
    if corrupt is not None:
        try:
            state.load_state_dict(corrupt)
        except ValueError as err:
            corrupt_error = str(err)
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        state.load_state_dict(resume["gmc"])
        start = int(resume["step"])
    data = make_dataset(cfg["num_samples"], 1)
    history: list[dict[str, Any]] = []
    checkpoint = None
    for step in range(start, cfg["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg["lr"], "cosine", cfg["steps"])
        x, y = rank_batch(data, rank, world, cfg["batch_size"], step)
        with state.detached_point():
            loss_fn(ddp, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics = state.take_metrics()
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        history.append({"params": params, "metrics": metrics, "state": state.state_dict()})
        if step + 1 == cfg["checkpoint_at"] and resume is None:
            gathered = state.gathered_state_dict()
            checkpoint = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "gmc": gathered,
                "step": step + 1,
            }
    return {"history": history, "checkpoint": checkpoint, "corrupt_error": corrupt_error}


def _with_bad_entry(gathered: dict[str, Any], rank: int) -> dict[str, Any]:
    """A copy of a gathered state whose rank-``rank`` residual of the first parameter is transposed."""
    entries = list(gathered["per_rank_local"])
    residual = dict(entries[rank]["buffers"]["residual"])
    first = next(iter(residual))
    residual[first] = residual[first].reshape(-1, 1)
    entries[rank] = {**entries[rank], "buffers": {**entries[rank]["buffers"], "residual": residual}}
    return {**gathered, "per_rank_local": entries}


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for name, case in cfg["cases"].items():
        first = train(cfg, case, None)
        # Every rank resumes from rank 0's checkpoint, as from one file.
        shared = [first["checkpoint"]]
        dist.broadcast_object_list(shared, src=0)
        corrupt = None
        if cfg.get("corrupt_entry") is not None:
            corrupt = _with_bad_entry(shared[0]["gmc"], cfg["corrupt_entry"])
        resumed = train(cfg, case, shared[0], corrupt)
        results[name] = {
            "run": first["history"],
            "resumed": resumed["history"],
            "corrupt_error": resumed["corrupt_error"],
        }
    torch.save(results, Path(cfg["out_dir"]) / f"rank{os.environ['RANK']}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
