"""Step time of the rank-ordered sum against the ring all-reduce, fp32, with K gloo ranks (default 3).

The summing routes (a shared support's values, the dense route) can add fp32 values with one ring
all-reduce (the back-end's order, which depends on K and on DDP's bucket layout) or in rank order (a
reduce-scatter that adds in rank order, then an all-gather; ``lightning_gmc/transport/exchange/
ordered.py``), which is what makes a run with K >= 3 bitwise equal to its simulation, to its resume and
to a run with another ``bucket_cap_mb``. The rank-ordered sum waits for its reduce-scatter in the hook
body, so communication overlaps less with the backward pass. This script measures what that costs.

K processes (``torch.multiprocessing.spawn``) on 127.0.0.1 with gloo, one intra-op thread each, train
an MLP (``--dims``) with plain DDP and ``gmc_hook`` arms built side by side and run **interleaved**
(every round one step of each arm, so load drift hits every arm alike): GMC with ``compressor="none"``
and GMC+ with RBGS at ``--density``, each with ``fp32_order="ring"`` and ``"rank"``. A step is
``zero_grad`` + forward + backward (with the hook's communication) + SGD step, timed after a barrier,
the max over ranks. Reported: median step ms per arm and the ratio rank / ring per compressor, with
the load average (the machine may be shared: compare ratios, not absolute times).

Run::

    python benchmarks/bench_sum_order.py                  # K = 3, MLP 2048-2048-2048-10 (8.4M)
    python benchmarks/bench_sum_order.py --ranks 4 --rounds 30
    python benchmarks/bench_sum_order.py --ranks 2 --bf16     # 16-bit values (always in rank order)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_step import BATCH, free_port, make_mlp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lightning_gmc

#: (label, compressor, fp32 order, wire dtype); 16-bit values are always summed in rank order
ARMS = (
    ("plain DDP", None, None, "fp32"),
    ("GMC none, ring", "none", "ring", "fp32"),
    ("GMC none, rank order", "none", "rank", "fp32"),
    ("GMC+ rbgs, ring", "rbgs", "ring", "fp32"),
    ("GMC+ rbgs, rank order", "rbgs", "rank", "fp32"),
)
#: with ``--bf16``: the 16-bit arms, beside the fp32 ones
BF16_ARMS = (
    ("GMC none, bf16", "none", "ring", "bf16"),
    ("GMC+ rbgs, bf16", "rbgs", "ring", "bf16"),
)


def build(dims: list[int], density: float, bf16: bool) -> list[tuple[str, nn.Module, Any, Any]]:
    arms = []
    for label, compressor, order, wire in (*ARMS, *(BF16_ARMS if bf16 else ())):
        module = make_mlp(dims)
        ddp = DistributedDataParallel(module)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
        state = None
        if compressor is not None:
            detach = 0.5 if compressor == "rbgs" else 0.0
            built = lightning_gmc.build_compressor(compressor, density=density, wire_dtype=wire)
            method = lightning_gmc.build_method("gmc", built, detach=detach)
            state = lightning_gmc.GMCHookState(method, seed=0)
            state.exchange.fp32_order = order
            state.attach(module, optimizer)
            ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
        arms.append((label, ddp, optimizer, state))
    return arms


def worker(rank: int, world: int, port: int, args: argparse.Namespace, result_path: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dims = [int(v) for v in args.dims.split(",")]
    arms = build(dims, args.density, args.bf16)
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(BATCH, dims[0], generator=gen)
    y = torch.randint(0, dims[-1], (BATCH,), generator=gen)
    times: dict[str, list[float]] = {label: [] for label, *_ in arms}
    collectives: dict[str, float] = {}
    for r in range(args.warmup + args.rounds):
        for label, model, optimizer, state in arms:
            dist.barrier()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            if state is not None:
                with state.detached_point():
                    nn.functional.cross_entropy(model(x), y).backward()
            else:
                nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if state is not None:
                collectives[label] = state.stats.take_step()["collectives"]
            if r >= args.warmup:
                times[label].append(float(dt))
    if rank == 0:
        numel = sum(p.numel() for p in arms[0][1].parameters())
        Path(result_path).write_text(
            json.dumps({"numel": numel, "times": times, "collectives": collectives, "load": os.getloadavg()})
        )
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--dims", default="2048,2048,2048,10")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="also the wire_dtype='bf16' arms")
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.ranks} gloo ranks x 1 thread; "
        f"MLP {args.dims}, batch {BATCH}; {args.rounds} interleaved rounds (+{args.warmup} warm-up); "
        f"load before: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    mp.spawn(worker, args=(args.ranks, free_port(), args, path), nprocs=args.ranks, join=True)
    result = json.loads(Path(path).read_text())
    os.unlink(path)
    medians = {label: statistics.median(t) for label, t in result["times"].items()}
    plain = medians["plain DDP"]
    print(f"Model: {result['numel']:,} parameters\n")
    print("| arm | median step ms | x plain DDP | collectives/step |")
    print("|---|---:|---:|---:|")
    for label, med in medians.items():
        coll = result["collectives"].get(label)
        print(f"| {label} | {med * 1e3:.1f} | {med / plain:.3f} | {'' if coll is None else f'{coll:.0f}'} |")
    for name in ("GMC none", "GMC+ rbgs"):
        ratio = medians[f"{name}, rank order"] / medians[f"{name}, ring"]
        print(f"\n{name}: rank order / ring = {ratio:.3f}")
        if f"{name}, bf16" in medians:
            print(f"{name}: bf16 / fp32 ring = {medians[f'{name}, bf16'] / medians[f'{name}, ring']:.3f}")
    print(f"\nload after: {' '.join(f'{v:.2f}' for v in result['load'])}")


if __name__ == "__main__":
    main()
