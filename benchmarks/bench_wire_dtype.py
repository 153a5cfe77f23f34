"""16-bit values on the wire: lightning_gmc's ``wire_dtype`` beside DDP's own ``bf16_compress_hook``.

Two gloo processes on loopback train the digits CNN (``examples/models.DigitsCNN``, scikit-learn's
digits, IID split, SGD lr 0.1 momentum 0.9 cosine, batch 16 per rank) for ``--epochs`` epochs per arm,
every arm from the same initial model and batch order:

* ``ddp fp32``: plain DDP (its own fp32 all-reduce);
* ``ddp bf16_compress_hook``: torch's ``default_hooks.bf16_compress_hook`` (divide by K, cast to bf16,
  all-reduce in bf16, cast back);
* ``dmsgd none`` fp32 / bf16: :func:`lightning_gmc.gmc_hook` with no compression, ``wire_dtype`` fp32
  and bf16 (dense, no error feedback: the equivalent of the bf16 hook);
* ``gmc none bf16``: GMC with the identity compressor in bf16 (error feedback absorbs the rounding);
* ``gmc topk_shared`` fp32 / bf16 at 1 %.

Reported per arm: bytes each rank sends per step (DDP arms: the ring formula ``2 (K-1)/K * n *
bytes``; lightning_gmc arms: the hook's accounting), mean step time (forward, backward, hook,
optimizer step; rank 0, after one warm-up epoch) and its ratio to ``ddp fp32`` measured in the same
run, and the final test accuracy on the 357 held-out digits::

    python benchmarks/bench_wire_dtype.py --epochs 10
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS: dict[str, dict[str, Any] | None] = {
    "ddp fp32": None,
    "ddp bf16_compress_hook": {"torch_hook": "bf16"},
    "dmsgd none fp32": {"method": "dmsgd", "compressor": "none", "wire_dtype": "fp32"},
    "dmsgd none bf16": {"method": "dmsgd", "compressor": "none", "wire_dtype": "bf16"},
    "gmc none bf16": {"method": "gmc", "compressor": "none", "wire_dtype": "bf16"},
    "gmc topk_shared 1% fp32": {"method": "gmc", "compressor": "topk_shared", "wire_dtype": "fp32"},
    "gmc topk_shared 1% bf16": {"method": "gmc", "compressor": "topk_shared", "wire_dtype": "bf16"},
}


def _data(
    rank: int, world: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from examples.data import DigitsDataModule

    data = DigitsDataModule(partition="iid", seed=0, num_shards=world)
    data.setup("fit")

    def stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
        return xs, torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])

    assert data.eval_full is not None
    return stack(data.shard(rank)), stack(data.eval_full)


def _worker(rank: int, world: int, port: int, epochs: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import lightning_gmc
    from examples.models import DigitsCNN

    (x_train, y_train), (x_test, y_test) = _data(rank, world)
    loss_fn = nn.CrossEntropyLoss()
    batch = 16
    steps = len(y_train) // batch
    results: dict[str, Any] = {}
    for label, spec in ARMS.items():
        torch.manual_seed(0)
        model = DigitsCNN()
        numel = sum(p.numel() for p in model.parameters())
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        state = None
        if spec is not None and "torch_hook" in spec:
            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
            sent = 2 * (world - 1) / world * 2 * numel
        elif spec is not None:
            config = lightning_gmc.GMCConfig(
                method=spec["method"], compressor=spec["compressor"], wire_dtype=spec["wire_dtype"]
            )
            state = lightning_gmc.GMCHookState.from_config(config)
            state.attach(model, optimizer)
            ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
            sent = 0.0
        else:
            sent = 2 * (world - 1) / world * 4 * numel
        times: list[float] = []
        measured: list[float] = []
        for epoch in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * 0.1 * (1 + math.cos(math.pi * epoch / epochs))
            order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch * 7 + rank))
            for step in range(steps):
                idx = order[step * batch : (step + 1) * batch]
                start = time.perf_counter()
                loss_fn(ddp(x_train[idx]), y_train[idx]).backward()
                optimizer.step()
                optimizer.zero_grad()
                elapsed = time.perf_counter() - start
                if epoch > 0:
                    times.append(elapsed)
                if state is not None:
                    measured.append(state.take_metrics()["bytes_sent"])
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        results[label] = {
            "bytes": sum(measured) / len(measured) if measured else sent,
            "step_ms": 1e3 * sum(times) / max(len(times), 1),
            "accuracy": accuracy,
            "numel": numel,
        }
    if rank == 0:
        torch.save(results, Path(out_dir) / "wire.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, port, args.epochs, out_dir), nprocs=2, join=True)
        results = torch.load(Path(out_dir) / "wire.pt")
    base = results["ddp fp32"]
    print(f"digits CNN ({base['numel']} parameters), K = 2 gloo ranks, {args.epochs} epochs")
    print("| arm | bytes/rank/step | vs ddp fp32 | step ms | vs ddp fp32 | test accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in results.items():
        print(
            f"| {label} | {row['bytes']:.0f} | {row['bytes'] / base['bytes']:.4f} | {row['step_ms']:.2f} | "
            f"{row['step_ms'] / base['step_ms']:.2f} | {row['accuracy']:.4f} |"
        )


if __name__ == "__main__":
    main()
