"""One rank of a 2-rank plain-DDP + ``gmc_hook`` run whose rank 1 stops at step 3.

``python dead_peer_script.py COMPRESSOR MODE STEPS`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT`` set. MODE ``exit``: rank 1 leaves with ``os._exit(0)`` before its step-3
forward (a killed peer); MODE ``exit_save`` too, and rank 0 catches the failure and tries to save its
GMC state (printing whether the momentum buffer changed in the failed step and whether the save was
refused). MODE ``nan``: both ranks use ``nonfinite="raise"`` and rank 1 feeds a NaN
batch at step 3, so its hook raises and its process ends. Each rank prints one line per finished
step, then ``done``.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lightning_gmc

STOP_STEP = 3


def main() -> None:
    compressor, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=15))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method = lightning_gmc.build_method("gmc", lightning_gmc.build_compressor(compressor, density=0.05))
    state = lightning_gmc.GMCHookState(method, nonfinite="raise" if mode == "nan" else "skip")
    state.attach(model, optimizer)
    ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
    data = torch.Generator().manual_seed(rank)
    for step in range(steps):
        x = torch.randn(8, 16, generator=data)
        y = torch.randint(0, 4, (8,), generator=data)
        if rank == 1 and step == STOP_STEP:
            if mode in ("exit", "exit_save"):
                os._exit(0)
            x = x * float("nan")
        loss = nn.functional.cross_entropy(ddp(x), y)
        if mode == "exit_save" and step == STOP_STEP:
            momentum = [t.clone() for t in state.worker.tensors["momentum"]]
            try:
                loss.backward()
            except RuntimeError as err:
                print(f"rank {rank} step {step} failed: {str(err)[:200]}", flush=True)
            after = state.worker.tensors["momentum"]
            changed = any(not torch.equal(a, b) for a, b in zip(momentum, after, strict=True))
            print(f"rank {rank} momentum changed in the failed step: {changed}", flush=True)
            try:
                state.state_dict()
                print(f"rank {rank} saved the GMC state", flush=True)
            except RuntimeError as err:
                print(f"rank {rank} refused to save: {err}", flush=True)
            os._exit(3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"rank {rank} finished step {step}", flush=True)
    print(f"rank {rank} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
