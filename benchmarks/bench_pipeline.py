"""Per-step cost of every method's hook through real DDP, in memcpys of the gradient beyond DDP + SGD.

One process, world size 1 (``DistributedDataParallel`` still runs the communication hook), one
``nn.Linear(4096, 4096)`` (16.8M parameters, one bucket with ``bucket_cap_mb`` large enough), batch 1,
``compressor="none"`` unless a variant names another. Every variant is its own model (same initial
weights) and its own optimizer, and they run **interleaved**: each round performs one optimizer step
of every variant and one ``copy_`` of a gradient-sized tensor, so load drift hits all alike.

A step is ``zero_grad(set_to_none=False)`` + forward + backward (with DDP's hook) + optimizer step.
For the hook variants the optimizer is ``torch.optim.SGD(momentum=0.9)`` too; the hook takes its
momentum over, so what it runs is momentum-free SGD. Reported per variant: the median step time and

    extra = (variant - DDP + SGD(momentum)) / copy_

the hook's per-step cost beyond what DDP + SGD with momentum spends, in memcpys of the gradient (the
goal is <= 3 for GMC and GMC+). The same table is printed for ``clone()`` (the GPU yardstick).

Run::

    python benchmarks/bench_pipeline.py                 # CPU, 1 thread, 16.8M parameters
    python benchmarks/bench_pipeline.py --quick         # 1M parameters, few rounds
    python benchmarks/bench_pipeline.py --device cuda   # one GPU (NCCL if available, else gloo)
"""

from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as dist
from harness import Arm, free_port, interleaved, large_ops, load_average, medians
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lightning_gmc

#: (label, method, compressor, density, method options)
VARIANTS: tuple[tuple[str, str, str, float, dict[str, object]], ...] = (
    ("GMC, none", "gmc", "none", 1.0, {}),
    ("GMC+, none (detach 0.5)", "gmc", "none", 1.0, {"detach": 0.5}),
    ("GMC+, rbgs 1% (detach 0.5)", "gmc", "rbgs", 0.01, {"detach": 0.5}),
    ("DMSGD (dense)", "dmsgd", "none", 1.0, {}),
    ("DGC w/o mfm, none", "dgc", "none", 1.0, {"momentum_masking": False}),
    ("EF + server momentum, none", "ef_server_momentum", "none", 1.0, {}),
    ("GMC lr inside, none", "gmc_lr_inside", "none", 1.0, {}),
    ("DEF-A, none (detach 0.3)", "def_a", "none", 1.0, {"detach": 0.3, "evaluation": "x_t"}),
    ("CSER, none", "cser", "none", 1.0, {}),
    ("EF (the optimizer keeps its momentum), none", "ef", "none", 1.0, {}),
    ("EF21 (the optimizer keeps its momentum), none", "ef21", "none", 1.0, {}),
)


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    state: lightning_gmc.GMCHookState | None = None


def make_model(width: int, device: torch.device) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(width, width).to(device)


def build(width: int, device: torch.device, selected: list[str]) -> list[Variant]:
    def sgd(model: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    cap = 8 * width * (width + 1) / 2**20 + 1  # one bucket holds everything
    variants = []
    local = make_model(width, device)
    variants.append(Variant("SGD(momentum), no DDP", local, sgd(local)))
    plain = DistributedDataParallel(make_model(width, device), bucket_cap_mb=cap)
    variants.append(Variant("DDP + SGD(momentum)", plain, sgd(plain)))
    for label, method, compressor, density, options in VARIANTS:
        if selected and not any(s.lower() in label.lower() for s in selected):
            continue
        module = make_model(width, device)
        ddp = DistributedDataParallel(module, bucket_cap_mb=cap)
        opt = sgd(module)
        config = lightning_gmc.GMCConfig(
            method=method, compressor=compressor, density=density, method_options=options
        )
        state = lightning_gmc.GMCHookState.from_config(config)
        state.attach(module, opt)
        ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
        variants.append(Variant(label, ddp, opt, state))
    return variants


def train_step(v: Variant, x: torch.Tensor) -> None:
    v.optimizer.zero_grad(set_to_none=False)
    if v.state is not None:
        with v.state.detached_point():
            v.model(x).square().mean().backward()
    else:
        v.model(x).square().mean().backward()
    v.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=4096, help="Linear(width, width): 16.8M parameters")
    parser.add_argument("--quick", action="store_true", help="width 1024, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 15, quick 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=[], help="substrings of the variant labels to run")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the process's CPU seconds, not wall-clock seconds (CPU; steadier on a loaded machine)",
    )
    args = parser.parse_args()
    width = 1024 if args.quick else args.width
    rounds = args.rounds or (5 if args.quick else 15)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=0, world_size=1)
    variants = build(width, device, args.only)
    numel = width * (width + 1)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    x = torch.randn(1, width, device=device)
    load = load_average()
    arms = [Arm("copy_", lambda: dst.copy_(src)), Arm("clone()", lambda: src.clone())]
    arms += [Arm(v.name, lambda v=v: train_step(v, x)) for v in variants]
    med = medians(interleaved(arms, rounds, args.warmup, device=device, cpu_time=args.cpu_time))
    copy, clone = med["copy_"], med["clone()"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, {name} ({device}), backend {backend}, "
        f"{torch.get_num_threads()} thread(s); "
        f"Linear({width}, {width}) = {numel:,} fp32 parameters, batch 1; {rounds} interleaved rounds "
        f"(+{args.warmup} warm-up), median {'CPU' if args.cpu_time else 'wall-clock'} time; "
        f"load average before: {load}\n"
    )
    print(f"copy_ of the gradient: {copy * 1e3:.2f} ms; clone(): {clone * 1e3:.2f} ms\n")
    base = med["DDP + SGD(momentum)"]
    passes = {v.name: len(large_ops(lambda v=v: train_step(v, x), numel // 2)) for v in variants}
    base_passes = passes["DDP + SGD(momentum)"]
    print("| Variant | median step ms | extra × copy_ | extra × clone() | gradient-sized ops (extra) |")
    print("|---|---:|---:|---:|---:|")
    for v in variants:
        step = med[v.name]
        print(
            f"| {v.name} | {step * 1e3:.2f} | {(step - base) / copy:+.2f} | {(step - base) / clone:+.2f} "
            f"| {passes[v.name]} ({passes[v.name] - base_passes:+d}) |"
        )
    print(
        f"\nextra = (step - DDP + SGD(momentum) step) / one copy; gradient-sized ops: the innermost ops of "
        f"one profiled step that touch a tensor of >= {numel // 2:,} elements (load-independent); "
        f"load average after: {load_average()}"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
