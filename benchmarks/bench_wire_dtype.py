"""16-bit values on the wire: lightning_gmc's ``wire_dtype`` beside DDP's own ``bf16_compress_hook``.

Two gloo processes on loopback train the digits CNN (``examples/models.DigitsCNN``, scikit-learn's
digits, IID split, SGD lr 0.1 momentum 0.9 cosine, batch 16 per rank) for ``--epochs`` epochs in every
arm, each arm from the same initial model and batch order, the arms **interleaved** (each training
step runs once in every arm in turn, ``benchmarks/harness.py``, so that load drift hits all alike):

* ``ddp fp32``: plain DDP (its own fp32 all-reduce);
* ``ddp bf16_compress_hook``: torch's ``default_hooks.bf16_compress_hook`` (divide by K, cast to bf16,
  all-reduce in bf16, cast back);
* ``dmsgd none`` fp32 / bf16: :func:`lightning_gmc.gmc_hook` with no compression, ``wire_dtype`` fp32
  and bf16 (dense, no error feedback: the equivalent of the bf16 hook);
* ``gmc none bf16``: GMC with the identity compressor in bf16 (error feedback absorbs the rounding);
* ``gmc topk_shared`` fp32 / bf16 at 1 %.

Reported per arm: bytes each rank sends per step (DDP arms: the ring formula ``2 (K-1)/K * n *
bytes``; lightning_gmc arms: the hook's accounting), median step time (forward, backward, hook,
optimizer step; rank 0, after one warm-up epoch) and its ratio to ``ddp fp32`` measured in the same
run, and the final test accuracy on the 357 held-out digits::

    python benchmarks/bench_wire_dtype.py --epochs 10
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import Arm, free_port, interleaved
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


@dataclass
class _Arm:
    """One arm's model, optimizer, hook state and what it measured."""

    label: str
    ddp: nn.parallel.DistributedDataParallel
    optimizer: torch.optim.SGD
    state: Any  # lightning_gmc.GMCHookState | None (imported in the worker)
    formula_bytes: float
    sent: list[float] = field(default_factory=list)


def _build(label: str, spec: dict[str, Any] | None, world: int) -> _Arm:
    import lightning_gmc
    from examples.models import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN()
    numel = sum(p.numel() for p in model.parameters())
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = None
    sent = 2 * (world - 1) / world * 4 * numel
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
    return _Arm(label, ddp, optimizer, state, sent)


def _worker(rank: int, world: int, port: int, epochs: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    (x_train, y_train), (x_test, y_test) = _data(rank, world)
    loss_fn = nn.CrossEntropyLoss()
    batch = 16
    steps = len(y_train) // batch
    arms = [_build(label, spec, world) for label, spec in ARMS.items()]
    epoch_batches: list[torch.Tensor] = []  # this epoch's batch order (the same for every arm)
    round_batch: list[torch.Tensor] = []

    def before_round(r: int) -> None:
        epoch, step = divmod(r, steps)
        if step == 0:
            for arm in arms:
                for group in arm.optimizer.param_groups:
                    group["lr"] = 0.5 * 0.1 * (1 + math.cos(math.pi * epoch / epochs))
            order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch * 7 + rank))
            epoch_batches[:] = order.split(batch)[:steps]
        round_batch[:] = [epoch_batches[step]]

    def train_step(arm: _Arm) -> None:
        (idx,) = round_batch
        loss_fn(arm.ddp(x_train[idx]), y_train[idx]).backward()
        arm.optimizer.step()
        arm.optimizer.zero_grad()

    def after(arm: _Arm) -> None:
        if arm.state is not None:
            arm.sent.append(arm.state.take_metrics()["bytes_sent"])

    timed = [
        Arm(arm.label, partial(train_step, arm), after=lambda _, arm=arm: after(arm)) for arm in arms
    ]
    # The first epoch is the warm-up: every arm steps through it, untimed.
    samples = interleaved(timed, rounds=(epochs - 1) * steps, warmup=steps, before_round=before_round)
    results: dict[str, Any] = {}
    for arm in arms:
        with torch.no_grad():
            accuracy = float((arm.ddp.module(x_test).argmax(1) == y_test).float().mean())
        results[arm.label] = {
            "bytes": statistics.fmean(arm.sent) if arm.sent else arm.formula_bytes,
            "step_ms": 1e3 * statistics.median(samples[arm.label]),
            "accuracy": accuracy,
            "numel": sum(p.numel() for p in arm.ddp.module.parameters()),
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
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, free_port(), args.epochs, out_dir), nprocs=2, join=True)
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
