"""One rank of a 2 nodes x 2 ranks plain-DDP run (``hierarchy="node"``) whose global rank 3 (node 1,
local rank 1) leaves with ``os._exit(0)`` before its step-3 forward, as a killed peer would.

Started by tests/distributed/test_node_reducer.py with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. Each rank prints one line per finished step, then ``done``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_gmc import GMCConfig, GMCHookState, gmc_hook
from lightning_gmc.hook import build_node_groups

STOP_STEP, STEPS, DEAD_RANK = 3, 8, 3


def main() -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = GMCHookState.from_config(GMCConfig(hierarchy="node", compressor="topk", density=0.05))
    state.set_node_groups(build_node_groups(2))
    state.attach(model, optimizer)
    ddp.register_comm_hook(state, gmc_hook)
    data = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        x = torch.randn(8, 16, generator=data)
        y = torch.randint(0, 4, (8,), generator=data)
        if rank == DEAD_RANK and step == STOP_STEP:
            os._exit(0)
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"rank {rank} finished step {step}", flush=True)
    print(f"rank {rank} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
