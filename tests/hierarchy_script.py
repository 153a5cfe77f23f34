"""One rank of a plain-DDP run with ``hierarchy="node"`` (started by tests/test_hierarchy.py).

Ranks come from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), the
way torchrun starts them; ``ranks_per_node`` consecutive ranks form a node. Every rank reads batch
``rank_batch(data, RANK, WORLD_SIZE, ...)``. For every case of the config, in order:

* ``mode`` ``"node"`` (every rank, hierarchical) or ``"pair"`` (flat, over local rank 0 of each node
  only: one rank per node, the K = N flat run; the other ranks wait);
* without ``load``: train ``steps`` steps, writing ``<case>.ckpt`` (model, optimizer, gathered GMC
  state) after ``checkpoint_at`` steps; then, in the same processes, build everything afresh, resume
  from it and train to ``steps`` again (``run`` and ``resumed`` histories);
* with ``load`` (a checkpoint file name in the output directory, or a path): resume from it and train
  to ``steps`` (``loaded`` history);
* with ``corrupt_entry: r`` (and no ``load``), the resumed run first tries a copy of the checkpoint
  whose rank-``r`` residual has the wrong shape and records the error (``corrupt_error``: every rank
  must refuse it alike; the good checkpoint then resumes);
* with ``error``: train until the error the case provokes and record its text on every rank
  (``nan_rank``: that rank's batch is NaN at ``bad_step``, for ``nonfinite="raise"``; ``huge_rank``:
  its loss is scaled by 1e9 then, to overflow an fp16 wire). Such cases come last.

``timeouts`` records the default group's timeout and that of the groups ``build_node_groups`` made.

Each history entry holds the parameters, the step's metrics and the rank's own GMC state (its pieces
under ``"node"``). Writes ``rank{RANK}.pt`` and, per case, ``<case>.ckpt``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import loss_fn, lr_at, make_dataset, make_model, rank_batch
from torch.nn.parallel import DistributedDataParallel

from lightning_gmc import GMCConfig, GMCHookState, gmc_hook
from lightning_gmc.hook import build_node_groups
from lightning_gmc.hook.hierarchy import default_group_timeout

BUCKETS: list[tuple[int, ...]] = []  # the parameter indices of each bucket of the current step


def recording_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real (not string) annotations
    BUCKETS.append(state.binding.parameter_indices(bucket.parameters()))
    return gmc_hook(state, bucket)


def train(
    cfg: dict[str, Any],
    case: dict[str, Any],
    resume: Path | None,
    save: Path | None,
    pair: dist.ProcessGroup | None,
) -> list[dict[str, Any]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(cfg["model"], 0)
    node = case.get("mode", "node") == "node"
    group = None if node else pair
    ddp = DistributedDataParallel(model, bucket_cap_mb=cfg["bucket_cap_mb"], process_group=group)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=1e-3)
    config = GMCConfig(hierarchy="node" if node else "flat", **case["config"])
    state = GMCHookState.from_config(config, process_group=group)
    if node:
        state.set_node_groups(build_node_groups(cfg["ranks_per_node"]), min_piece=cfg["min_piece"])
    state.attach(model, optimizer)
    ddp.register_comm_hook(state, recording_hook)
    start = 0
    if resume is not None:
        saved = torch.load(resume, weights_only=False)
        if case.get("corrupt_entry") is not None:
            try:
                state.load_state_dict(_with_bad_entry(saved["gmc"], case["corrupt_entry"]))
            except ValueError as err:
                CORRUPT_ERRORS.append(str(err))
            else:
                CORRUPT_ERRORS.append(None)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.load_state_dict(saved["gmc"])
        start = int(saved["step"])
    data = make_dataset(cfg["num_samples"], 1)
    history: list[dict[str, Any]] = []
    for step in range(start, cfg["steps"]):
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_at(step, cfg["lr"], "cosine", cfg["steps"])
        x, y = rank_batch(data, rank, world, cfg["batch_size"], step)
        bad = step == case.get("bad_step")
        if bad and rank == case.get("nan_rank"):
            x = x * float("nan")
        BUCKETS.clear()
        with state.detached_point():
            loss = loss_fn(ddp, x, y)
            if bad and rank == case.get("huge_rank"):
                loss = loss * 1e9  # gradients beyond fp16's range
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics = state.take_metrics()
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        history.append(
            {
                "params": params,
                "metrics": metrics,
                "state": state.state_dict(),
                "state_bytes": state.method_state_bytes,
                "buckets": list(BUCKETS),
            }
        )
        if save is not None and step + 1 == cfg["checkpoint_at"]:
            gathered = state.gathered_state_dict()
            if dist.get_rank(group) == 0:
                checkpoint = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "gmc": gathered,
                    "step": step + 1,
                }
                torch.save(checkpoint, save)
            dist.barrier(group)
    return history


CORRUPT_ERRORS: list[str | None] = []


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
    out_dir = Path(cfg["out_dir"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg["timeout_s"]))
    per_node = cfg["ranks_per_node"]
    nodes = dist.get_world_size() // per_node
    pair_ranks = [n * per_node for n in range(nodes)]
    pair = dist.new_group(pair_ranks)  # every rank creates every group
    in_pair = dist.get_rank() in pair_ranks
    groups = build_node_groups(per_node)
    backend = torch.device("cpu")
    results: dict[str, Any] = {
        "timeouts": [
            default_group_timeout(),
            groups.intra._get_backend(backend).options._timeout,
            groups.inter._get_backend(backend).options._timeout,
        ]
    }
    for name, case in cfg["cases"].items():
        node = case.get("mode", "node") == "node"
        group = pair if in_pair and not node else None
        if "error" in case:
            try:
                train(cfg, case, None, None, None)
            except Exception as err:  # every rank must stop here, with the same message
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            else:
                results[name] = {"error": None}
            continue
        if node or in_pair:
            if "load" in case:
                source = Path(case["load"]) if os.path.isabs(case["load"]) else out_dir / case["load"]
                results[name] = {"loaded": train(cfg, case, source, None, group)}
            else:
                checkpoint = out_dir / f"{name}.ckpt"
                run = train(cfg, case, None, checkpoint, group)
                CORRUPT_ERRORS.clear()
                resumed = train(cfg, case, checkpoint, None, group)
                results[name] = {"run": run, "resumed": resumed, "corrupt_error": list(CORRUPT_ERRORS)}
        dist.barrier()
    torch.save(results, out_dir / f"rank{os.environ['RANK']}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
