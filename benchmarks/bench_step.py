"""DDP step time of the GMC hook against plain DDP on 2 gloo ranks (goals G2-G5 of docs/benchmarks.md).

Two processes (``torch.multiprocessing.spawn``) on 127.0.0.1 with gloo, one intra-op thread each,
train an MLP (``--dims``, default 4096-4096-2048-10, 25.2M parameters, batch 8) with several
``DistributedDataParallel`` models built side by side in the same process pair and run
**interleaved**: every round performs one optimizer step of each variant, so that load drift hits every
variant alike. A step is ``zero_grad`` + forward + backward (with DDP's communication) + SGD step; it
is timed after a ``barrier`` and reported as the max over ranks.

Variants:

* ``compute only``: the same model without DDP (no communication at all);
* ``plain DDP``: DDP's built-in bucketed all-reduce;
* ``fp16_compress_hook``: torch's fp16 compression hook;
* ``GMC topk_approx``, ``GMC topk``: ``gmc_hook`` with GMC and sampled-threshold / exact top-k;
* ``GMC+ rbgs``: ``gmc_hook`` with GMC+ (detach 0.5) and RBGS, gradients at the detached point.

All at density 1 % (``--density``). Reported: median step time, ratio to plain DDP, the fraction of
exposed communication removed, ``(plain - variant) / (plain - compute only)`` (goal G3), wire bytes
and collectives per step from ``state.stats`` (formula values for the dense variants), and d-sized
allocations in one profiled steady-state step (goal G5, relative to plain DDP).

Afterwards, **sequentially** (not interleaved), a small end-to-end Lightning comparison:
``Trainer(strategy=GMCStrategy(...))`` against ``strategy="ddp"`` (both spawned, 2 CPU devices, same
model and steps), in the order ddp, GMC, ddp, GMC.

Run::

    python benchmarks/bench_step.py            # 25.2M parameters, ~6 min on 2 cores
    python benchmarks/bench_step.py --quick    # ~2M parameters, few rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import Arm, free_port, interleaved, large_allocations, load_average
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import lightning_gmc
from lightning_gmc.transport import ring_allreduce_bytes

WORLD = 2
BATCH = 8


def make_mlp(dims: list[int]) -> nn.Sequential:
    """``Linear-ReLU-...-Linear`` with the given layer widths, seeded identically on every rank."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Variant:
    """One model, its optimizer and (for the GMC hook) its state."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    state: lightning_gmc.GMCHookState | None = None
    dense_bytes_per_element: float = 0.0
    times: list[float] = field(default_factory=list)
    bytes_sent: list[float] = field(default_factory=list)
    collectives: list[float] = field(default_factory=list)
    hook_calls: list[int] = field(default_factory=list)
    _calls_before: int = 0

    def arm(self, x: torch.Tensor, y: torch.Tensor) -> Arm:
        """One step per round, after a barrier; then the hook's traffic counters of the step."""

        def setup() -> None:
            dist.barrier()
            self._calls_before = self.state.hook_calls if self.state is not None else 0

        def after(measured: bool) -> None:
            if self.state is None:
                return
            metrics = self.state.stats.take_step()
            if measured:
                self.bytes_sent.append(metrics["bytes_sent"])
                self.collectives.append(metrics["collectives"])
                self.hook_calls.append(self.state.hook_calls - self._calls_before)

        return Arm(self.name, lambda: train_step(self, x, y), setup=setup, after=after)


def build_variants(dims: list[int], density: float, lr: float) -> list[Variant]:
    """Every variant's model (same initial weights) with its optimizer and hook."""

    def sgd(model: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    variants = []
    local = make_mlp(dims)
    variants.append(Variant("compute only (no DDP)", local, sgd(local)))
    plain = DistributedDataParallel(make_mlp(dims))
    variants.append(Variant("plain DDP", plain, sgd(plain), dense_bytes_per_element=4.0))
    fp16 = DistributedDataParallel(make_mlp(dims))
    fp16.register_comm_hook(None, default_hooks.fp16_compress_hook)
    variants.append(Variant("fp16_compress_hook", fp16, sgd(fp16), dense_bytes_per_element=2.0))
    for label, compressor, detach in (
        (f"GMC topk_approx {density:.1%}", "topk_approx", 0.0),
        (f"GMC topk {density:.1%}", "topk", 0.0),
        (f"GMC+ rbgs {density:.1%} (detach 0.5)", "rbgs", 0.5),
    ):
        module = make_mlp(dims)
        ddp = DistributedDataParallel(module)
        opt = sgd(module)
        method = lightning_gmc.build_method(
            "gmc", lightning_gmc.build_compressor(compressor, density=density), detach=detach
        )
        state = lightning_gmc.GMCHookState(method, seed=0)
        state.attach(module, opt)
        ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
        variants.append(Variant(label, ddp, opt, state))
    return variants


def train_step(v: Variant, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step of a variant (GMC+ evaluates the gradient at its detached point)."""
    v.optimizer.zero_grad(set_to_none=False)
    if v.state is not None:
        with v.state.detached_point():
            nn.functional.cross_entropy(v.model(x), y).backward()
    else:
        nn.functional.cross_entropy(v.model(x), y).backward()
    v.optimizer.step()


def slowest_rank(seconds: float) -> float:
    """The step time of the slowest rank (an all-reduce: every rank calls it for every step)."""
    worst = torch.tensor([seconds])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def worker(rank: int, port: int, args: argparse.Namespace, result_path: str) -> None:
    """One rank of the interleaved benchmark."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    dims = [int(v) for v in args.dims.split(",")]
    variants = build_variants(dims, args.density, args.lr)
    numel = sum(p.numel() for p in variants[0].model.parameters())
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(BATCH, dims[0], generator=gen)
    y = torch.randint(0, dims[-1], (BATCH,), generator=gen)
    samples = interleaved([v.arm(x, y) for v in variants], args.rounds, args.warmup, combine=slowest_rank)
    for v in variants:
        v.times = samples[v.name]
    # One profiled steady-state step per variant (rank 0 counts; both ranks must run the step).
    allocs = {}
    for v in variants:
        dist.barrier()
        allocs[v.name] = large_allocations(lambda v=v: train_step(v, x, y), numel // 2)[0]
        if v.state is not None:
            v.state.stats.take_step()
    if rank == 0:
        out: dict[str, Any] = {"numel": numel, "load": load_average(), "variants": {}}
        for v in variants:
            out["variants"][v.name] = {
                "times": v.times,
                "bytes_sent": statistics.median(v.bytes_sent)
                if v.bytes_sent
                else ring_allreduce_bytes(v.dense_bytes_per_element * numel, WORLD),
                "collectives": statistics.median(v.collectives) if v.collectives else None,
                "buckets": statistics.median(v.hook_calls) if v.hook_calls else None,
                "allocs": allocs[v.name],
                "hooked": v.state is not None,
            }
        Path(result_path).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def report(result: dict[str, Any]) -> None:
    """Print the interleaved-run table."""
    variants = result["variants"]
    med = {name: statistics.median(v["times"]) for name, v in variants.items()}
    plain = med["plain DDP"]
    compute = med["compute only (no DDP)"]
    numel = result["numel"]
    dense = ring_allreduce_bytes(4 * numel, WORLD)
    print(
        "| Variant | median step ms | × plain DDP | exposed comm removed | wire MB/step/rank | × dense bytes "
        "| collectives/step (buckets) | d-sized allocs/step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, v in variants.items():
        removed = (plain - med[name]) / (plain - compute) if name != "compute only (no DDP)" else None
        if name == "compute only (no DDP)":
            wire = "0"
            ratio = "0"
            coll = "0"
        else:
            wire = f"{v['bytes_sent'] / 1e6:.2f}"
            ratio = f"{v['bytes_sent'] / dense:.4f}"
            coll = f"{v['collectives']:.0f} ({v['buckets']:.0f})" if v["hooked"] else "(formula)"
        removed_s = "" if removed is None else f"{removed:+.0%}"
        print(
            f"| {name} | {med[name] * 1e3:.1f} | {med[name] / plain:.2f} | {removed_s} | {wire} | {ratio} "
            f"| {coll} | {v['allocs']} |"
        )
    spread = {name: (min(v["times"]) * 1e3, max(v["times"]) * 1e3) for name, v in variants.items()}
    print(
        "\nmin/max step ms per variant: " + ", ".join(f"{n}: {a:.0f}/{b:.0f}" for n, (a, b) in spread.items())
    )


# ----------------------------------------------------------------------------- Lightning part
class MLPModule(pl.LightningModule):
    """The benchmark MLP with plain ``SGD(momentum=0.9)``."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.net = make_mlp(dims)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(pl.Callback):
    """Records ``perf_counter`` at every batch start and at the end; rank 0 writes them to a file."""

    def __init__(self, out_path: str) -> None:
        self.out_path = out_path
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        torch.set_num_threads(1)
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.stamps.append(time.perf_counter())
        if trainer.global_rank == 0:
            Path(self.out_path).write_text(json.dumps(self.stamps))


def lightning_worker(
    rank: int, port: int, strategy_name: str, dims: list[int], steps: int, density: float, out_path: str
) -> None:
    """One rank of a Lightning fit, launched by us (Lightning sees LOCAL_RANK and does not launch).

    ``GMCStrategy(start_method="spawn")`` cannot be used: its state is not picklable (see
    ``docs/benchmarks.md``), so both strategies run with Lightning's external-launch path instead.
    """
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(BATCH * steps, dims[0], generator=gen), torch.randint(0, dims[-1], (BATCH * steps,))
    )
    if strategy_name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy: Any = DDPStrategy(process_group_backend="gloo")
    else:
        compressor, detach = strategy_name.split(":")
        strategy = lightning_gmc.GMCStrategy(compressor=compressor, density=density, detach=float(detach))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepTimer(out_path)],
    )
    trainer.fit(MLPModule(dims), DataLoader(data, batch_size=BATCH))


def lightning_comparison(dims: list[int], steps: int, density: float, skip: int) -> None:
    """ddp, GMC+/RBGS, ddp, GMC+/RBGS, each a fresh spawned 2-process Lightning fit."""
    runs = [("ddp", "ddp"), ("GMCStrategy GMC+ rbgs", "rbgs:0.5")] * 2
    medians: dict[str, list[float]] = {}
    print(f"\nLightning, sequential runs of {steps} steps (first {skip} skipped), median step ms:\n")
    print("| Run | strategy | median step ms |")
    print("|---|---|---:|")
    for i, (label, name) in enumerate(runs):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        mp.spawn(lightning_worker, args=(free_port(), name, dims, steps, density, path), nprocs=WORLD)
        stamps = json.loads(Path(path).read_text())
        os.unlink(path)
        deltas = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][skip:]
        med = statistics.median(deltas)
        medians.setdefault(label, []).append(med)
        print(f"| {i + 1} | {label} | {med * 1e3:.1f} |")
    ddp = statistics.mean(medians["ddp"])
    gmc = statistics.mean(medians["GMCStrategy GMC+ rbgs"])
    print(f"\nLightning GMCStrategy / Lightning ddp (mean of the two medians each): {gmc / ddp:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", default="4096,4096,2048,10", help="MLP layer widths")
    parser.add_argument("--quick", action="store_true", help="~2M-parameter MLP, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 15, quick 4)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="unmeasured rounds first (DDP rebuilds buckets)"
    )
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lightning-steps", type=int, default=None, help="steps per Lightning run (0: skip)")
    args = parser.parse_args()
    if args.quick:
        args.dims = "1024,1024,512,10" if args.dims == parser.get_default("dims") else args.dims
    args.rounds = args.rounds or (4 if args.quick else 15)
    lightning_steps = args.lightning_steps if args.lightning_steps is not None else (8 if args.quick else 25)
    dims = [int(v) for v in args.dims.split(",")]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {WORLD} gloo ranks on 127.0.0.1 x 1 thread; "
        f"MLP {args.dims}, batch {BATCH}; density {args.density:g}; {args.rounds} interleaved rounds "
        f"(+{args.warmup} warm-up); load average before: {load_average()}\n"
    )
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    mp.spawn(worker, args=(free_port(), args, result_path), nprocs=WORLD, join=True)
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    print(f"Model: {result['numel']:,} parameters\n")
    report(result)
    print(f"load average after the interleaved run: {result['load']}")
    if lightning_steps:
        lightning_comparison(dims, lightning_steps, args.density, skip=min(3, lightning_steps // 3))
        print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
