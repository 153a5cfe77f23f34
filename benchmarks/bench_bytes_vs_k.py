"""Bytes per rank per step versus the number of ranks K, for every route a sparsifier can take.

Two parts, printed side by side in one run:

* **measured**: real runs of K = 2 and K = 4 gloo processes on loopback (plain DDP with
  :func:`lightning_gmc.gmc_hook`, one bucket), GMC with ``none`` (dense), ``topk``, ``topk_approx``,
  ``topk_shared`` and ``rbgs`` at 1 % density, fp32 and bf16 values; the hook's ``bytes_sent`` and
  ``bytes_to_collectives`` of the last step are compared with the formula (ratio measured/formula);
* **formula** up to K = 1024 (ring model, ``docs/algorithms.md`` 3.7, 3.10, 3.12 and 3.13): dense
  ``2 (K-1)/K 4d``; ``topk``/``topk_approx`` all-gather ``(K-1) 8k`` until it exceeds the dense
  all-reduce, then the dense route; ``topk_shared`` ``(K-1)/K 4k`` (index broadcast) ``+ 2 (K-1)/K 4k``;
  ``rbgs`` ``2 (K-1)/K 4k``; bf16 halves every value term (indices stay int32). A sum taken in rank
  order (16-bit values; a sparse support's fp32 values with K >= 3) sends its padded vector instead of
  ``k`` or ``d`` values (:func:`summed`).

Writes a markdown table and ``docs/scaleout_bytes_vs_k.png``::

    python benchmarks/bench_bytes_vs_k.py            # measured K=2,4 + formula to 1024, with the plot
    python benchmarks/bench_bytes_vs_k.py --no-runs  # formula only
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import free_port
from torch import nn

COMPRESSORS = ("none", "topk", "topk_approx", "topk_shared", "rbgs")
DENSITY = 0.01
LAYERS = (512, 1024, 1024, 10)  # an MLP of 1.58M parameters, one DDP bucket
STEPS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(LAYERS[:-1], LAYERS[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def parameter_sizes() -> list[int]:
    return [p.numel() for p in make_model().parameters()]


def selected(sizes: list[int], density: float) -> int:
    from lightning_gmc.compressors import selected_count

    return sum(selected_count(density, n) for n in sizes)


def owner_padded(counts: list[int], world: int) -> int:
    """Elements of a 16-bit sum's reduce-scatter: element j of parameter p belongs to worker
    (p + j) mod K and every worker's share is padded to the longest (docs/algorithms.md 3.12)."""
    shares = [0] * world
    for p, n in enumerate(counts):
        for r in range(world):
            shares[r] += n // world
        for j in range(n % world):
            shares[(p + j) % world] += 1
    return world * max(shares)


def summed(counts: list[int], world: int, value_bytes: int, sparse: bool) -> int:
    """Elements a summing route hands to its collectives as the first (or only) input: the values in one
    ring all-reduce (fp32 with K = 2, or a dense fp32 vector), padded to K equal contiguous chunks (a
    sparse support's fp32 values with K >= 3, in rank order), or padded per owner (16-bit values)."""
    total = sum(counts)
    if value_bytes == 2:
        return owner_padded(counts, world)
    if sparse and world >= 3:
        return -(-total // world) * world
    return total


def formula(compressor: str, world: int, sizes: list[int], density: float, value_bytes: int = 4) -> float:
    """Bytes each rank sends per step (ring model), written out independently of the library."""
    from lightning_gmc.compressors import selected_count

    d, k = sum(sizes), selected(sizes, density)
    counts = [selected_count(density, n) for n in sizes]
    ring = 2 * (world - 1) / world
    dense = ring * value_bytes * summed(sizes, world, value_bytes, sparse=False)
    if compressor == "none":
        return dense
    if compressor in ("topk", "topk_approx"):
        gather = (world - 1) * (value_bytes + 4) * k
        return gather if gather <= ring * 4 * d else dense  # the route compares with an fp32 dense all-reduce
    if compressor == "topk_shared":
        return (world - 1) / world * 4 * k + ring * value_bytes * summed(counts, world, value_bytes, True)
    if compressor == "rbgs":
        return ring * value_bytes * summed(counts, world, value_bytes, True)
    raise ValueError(compressor)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import lightning_gmc

    results: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(rank)
    for name in COMPRESSORS:
        for wire in ("fp32", "bf16"):
            model = make_model()
            ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1000)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            config = lightning_gmc.GMCConfig(compressor=name, density=DENSITY, wire_dtype=wire)
            state = lightning_gmc.GMCHookState.from_config(config)
            state.attach(model, optimizer)
            ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
            for _ in range(STEPS):
                x = torch.randn(32, LAYERS[0], generator=gen)
                ddp(x).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                metrics = state.take_metrics()
            results[f"{name}/{wire}"] = {
                "bytes_sent": metrics["bytes_sent"],
                "bytes_to_collectives": metrics["bytes_to_collectives"],
                "collectives": metrics["collectives"],
            }
    if rank == 0:
        torch.save(results, Path(out_dir) / f"k{world}.pt")
    dist.destroy_process_group()


def measure(world: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, free_port(), out_dir), nprocs=world, join=True)
        return torch.load(Path(out_dir) / f"k{world}.pt")


def plot(sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [2**i for i in range(1, 11)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in COMPRESSORS:
        ax.plot(worlds, [formula(name, k, sizes, DENSITY) / 1e6 for k in worlds], marker="o", label=name)
    ax.plot(
        worlds,
        [formula("topk_shared", k, sizes, DENSITY, value_bytes=2) / 1e6 for k in worlds],
        marker="x",
        linestyle="--",
        label="topk_shared, bf16",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks K")
    ax.set_ylabel("MB sent per rank per step")
    ax.set_title(f"{sum(sizes) / 1e6:.2f}M parameters, density {DENSITY:g} (ring model)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-runs", action="store_true", help="formula only (no gloo processes)")
    parser.add_argument("--plot", default="docs/scaleout_bytes_vs_k.png")
    args = parser.parse_args()
    sizes = parameter_sizes()
    d, k = sum(sizes), selected(sizes, DENSITY)
    print(f"model: {d} parameters in {len(sizes)} tensors; density {DENSITY:g}: k = {k}")

    if not args.no_runs:
        print("\nmeasured (hook accounting, last of 3 steps, gloo loopback) vs formula")
        print("| K | compressor | wire | bytes_sent | formula | measured/formula | handed | collectives |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for world in (2, 4):
            measured = measure(world)
            for name in COMPRESSORS:
                for wire in ("fp32", "bf16"):
                    row = measured[f"{name}/{wire}"]
                    expected = formula(name, world, sizes, DENSITY, 2 if wire == "bf16" else 4)
                    print(
                        f"| {world} | {name} | {wire} | {row['bytes_sent']:.0f} | {expected:.0f} | "
                        f"{row['bytes_sent'] / expected:.6f} | {row['bytes_to_collectives']:.0f} | "
                        f"{row['collectives']:.0f} |"
                    )

    print("\nformula: MB per rank per step (ratio to the dense fp32 all-reduce)")
    print("| K | " + " | ".join(COMPRESSORS) + " | topk_shared bf16 |")
    print("|---:|" + "---:|" * (len(COMPRESSORS) + 1))
    for world in [2**i for i in range(1, 11)]:
        dense = formula("none", world, sizes, DENSITY)
        cells = [formula(name, world, sizes, DENSITY) for name in COMPRESSORS]
        cells.append(formula("topk_shared", world, sizes, DENSITY, value_bytes=2))
        print(f"| {world} | " + " | ".join(f"{c / 1e6:.3f} ({c / dense:.4f})" for c in cells) + " |")
    plot(sizes, Path(args.plot))
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
