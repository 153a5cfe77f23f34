"""Two gloo ranks with CUDA tensors on one GPU (run by ``tests/test_cuda.py``; prints OK).

Both ranks put their model on ``cuda:0`` and train with ``DistributedDataParallel`` over gloo:

* GMC with the identity compressor (the all-reduce route) against plain DDP + SGD(momentum) on the
  same ranks and data: equal up to float rounding;
* GMC with top-k (the all-gather route of uint8 byte buffers): both ranks end with bit-identical
  parameters and count exactly the wire formula's bytes.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lightning_gmc
from lightning_gmc.compressors.base import selected_count

WORLD = 2
STEPS = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 6)).cuda()


def _train(rank: int, compressor: str | None) -> tuple[list[torch.Tensor], float]:
    module = _model()
    ddp = DistributedDataParallel(module, device_ids=[0])
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    state = None
    if compressor is not None:
        method = lightning_gmc.build_method("gmc", lightning_gmc.build_compressor(compressor, density=0.25))
        state = lightning_gmc.GMCHookState(method, seed=0)
        state.attach(module, opt)
        ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
    gen = torch.Generator().manual_seed(10 + rank)
    sent = 0.0
    for _ in range(STEPS):
        x = torch.randn(8, 24, generator=gen).cuda()
        y = torch.randint(0, 6, (8,), generator=gen).cuda()
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        if state is not None:
            sent += state.take_metrics()["bytes_sent"]
    return [p.detach().cpu() for p in module.parameters()], sent


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    reference, _ = _train(rank, None)
    dense, _ = _train(rank, "none")
    for a, b in zip(dense, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sparse, sent = _train(rank, "topk")
    gathered: list[list[torch.Tensor]] = [[] for _ in range(WORLD)]
    dist.all_gather_object(gathered, sparse)
    for a, b in zip(gathered[0], gathered[1], strict=True):
        assert torch.equal(a, b), "ranks disagree"
    numel = sum(p.numel() for p in sparse)
    k = sum(selected_count(0.25, p.numel()) for p in sparse)
    # all-gather of k fp32 values + k int32 indices per step, sent to K - 1 peers
    assert sent == STEPS * (WORLD - 1) * 8 * k, (sent, numel, k)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device")
        sys.exit(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_worker, args=(port,), nprocs=WORLD)
    print("OK")


if __name__ == "__main__":
    main()
