"""One rank of a 2-rank plain-DDP run whose fp16 wire overflows (``test_fp16_overflow_distributed.py``).

``python fp16_overflow_script.py MODE OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set; the model has several DDP buckets and the overflow is planted in the first
layer's gradient (the step's last bucket), so earlier buckets were already exchanged.

* ``catch``: rank 1 alone overflows at step 2, both ranks at step 4; every rank catches the error and
  goes on. Then the same training without steps 2 and 4, from the same start. Each rank saves both
  runs' final parameters, optimizer state and GMC state, and the errors it caught.
* ``uncaught-one`` / ``uncaught-all``: rank 1 / every rank overflows at step 2 and nobody catches it:
  every process must end with the error (exit status 1), none may abort.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lightning_gmc

STEPS = 6


def train(rank: int, skip: set[int], blow_up: dict[int, set[int]], catch: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compressor = lightning_gmc.build_compressor("rbgs", density=0.1, wire_dtype="fp16")
    state = lightning_gmc.GMCHookState(lightning_gmc.build_method("gmc", compressor))
    state.attach(model, optimizer)
    ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
    scale = {"now": 1.0}
    model[0].weight.register_hook(lambda grad: grad * scale["now"])
    errors = []
    gen = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        if step in skip:
            continue
        scale["now"] = 1e9 if rank in blow_up.get(step, set()) else 1.0
        try:
            nn.functional.cross_entropy(ddp(x), y).backward()
        except RuntimeError as err:
            if not catch:
                raise
            errors.append(f"step {step}: {err}")
            optimizer.zero_grad()
            continue
        optimizer.step()
        optimizer.zero_grad()
        print(f"rank {rank} finished step {step}", flush=True)
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict()["state"],
        "gmc": state.state_dict(),
        "step": state.step,
        "errors": errors,
    }


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    if mode == "catch":
        refused = train(rank, set(), {2: {1}, 4: {0, 1}}, catch=True)
        reference = train(rank, {2, 4}, {}, catch=False)
        torch.save({"refused": refused, "reference": reference}, out_dir / f"rank{rank}.pt")
    else:
        train(rank, set(), {2: {1} if mode == "uncaught-one" else {0, 1}}, catch=False)
    print(f"rank {rank} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
