"""Compressor cost as a ratio of a memory copy of the same gradient (goals G1/G5/G6 of docs/benchmarks.md).

For a flat fp32 vector of ``d`` elements (``--numel``, default 25M; ``--quick`` uses 1M) split into
segments the way a real bucket is, this measures, in **interleaved rounds** (every op once per round,
median per op, so that load drift hits every op alike):

* floors: a preallocated ``copy_`` and an allocating ``clone()`` of the same vector, and exact
  ``torch.topk(|x|, k)`` over the whole vector at each density (the reference of goal G1);
* for every built-in sparsifier (``none``, ``topk``, ``topk_approx``, ``randk``, ``rbgs``) at densities
  1 % and 0.1 %: ``compress`` followed by ``subtract_own`` (what the error-feedback step does), and
  ``decompress_add`` of a payload as it arrives from another rank (for all-gather compressors: int32
  indices from the wire, not the local index context);
* the full per-bucket GMC pipeline of one worker, as the DDP hook runs it: ``method.encode`` (EF
  accumulate, global momentum, compress, residual update), a local decode of the worker's own payload
  (``decode_mean``) and ``method.decode`` (momentum and output copies); plus the number of d-sized
  allocations (``>= d/2`` bytes) one steady-state step makes (goal G5).

Segment layouts (``--layout``):

* ``single``: one parameter of ``d`` elements (a worst case for per-parameter top-k);
* ``resnet50``: the 161 parameter sizes of torchvision's ResNet-50 (25.56M in total), each scaled
  by ``d / 25.56M`` (so at the default ``d`` it is ResNet-50 itself, in ``named_parameters`` order).

Run::

    python benchmarks/bench_compressors.py            # d = 25M, both layouts, ~5 min on 2 cores
    python benchmarks/bench_compressors.py --quick    # d = 1M, few rounds
    python benchmarks/bench_compressors.py --device cuda --layout single   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from harness import Arm, interleaved, large_allocations, load_average, medians
from torch import Tensor

from lightning_gmc.compressors import (
    Compressor,
    Payload,
    RandomStreams,
    Segment,
    Workspace,
    build_compressor,
    segments_from_numels,
)
from lightning_gmc.methods import BucketStep, GroupHyper, ParameterTable, WorkerState, build_method
from lightning_gmc.transport import decode_mean

SPARSIFIERS = ("none", "topk", "topk_approx", "randk", "rbgs")
DENSITIES = (0.01, 0.001)
RESNET50_NUMEL = 25_557_032


def resnet50_numels() -> list[int]:
    """Parameter sizes of torchvision's ResNet-50 in ``named_parameters`` order (161 tensors)."""
    import torchvision

    return [p.numel() for p in torchvision.models.resnet50().parameters()]


def layout(name: str, numel: int) -> tuple[Segment, ...]:
    """Segments of a flat vector of about ``numel`` elements (see the module docstring)."""
    if name == "single":
        return segments_from_numels([numel])
    if name == "resnet50":
        scale = numel / RESNET50_NUMEL
        return segments_from_numels([max(1, round(n * scale)) for n in resnet50_numels()])
    raise ValueError(f"unknown layout {name!r}")


#: Where the benchmark runs (``--device``).
DEVICE = torch.device("cpu")


def received(payload: Payload) -> Payload:
    """The payload as another rank receives it: wire tensors only, no local index context."""
    return Payload(dict(payload.tensors))


def compressor_ops(
    name: str, density: float, x: Tensor, work: Tensor, out: Tensor, segments: tuple[Segment, ...]
) -> list[Arm]:
    """``compress + subtract_own`` and ``decompress_add`` of one compressor."""
    comp: Compressor = build_compressor(name, density=density)
    plan = comp.plan(segments)
    rng = RandomStreams(seed=0, rank=0)
    workspace = torch.empty_like(x)
    payload_owner = Workspace()  # what a bucket's message slot is in training
    state: dict[str, Payload] = {}
    step = [0]

    def encode() -> None:
        step[0] += 1
        payload = comp.compress(work, plan, rng, step[0], payload_owner)
        comp.subtract_own(work, payload, plan, workspace)
        state["payload"] = payload

    # One payload to decode, computed once (decode cost does not depend on the values).
    work.copy_(x)
    state["payload"] = comp.compress(work, plan, rng, 0, Workspace())
    wire = received(state["payload"]) if not comp.shared_support else state["payload"]
    label = name if name == "none" else f"{name} {density:.1%}"
    return [
        Arm(f"{label} | compress+subtract_own", encode, setup=lambda: work.copy_(x)),
        Arm(f"{label} | decompress_add", lambda: comp.decompress_add(wire, plan, out)),
    ]


class Pipeline:
    """One worker's per-bucket GMC step, as :func:`lightning_gmc.gmc_hook` runs it with K = 1.

    Encode (EF accumulate, global momentum, compress, residual update), local decode of the own
    payload into the bucket's ``mean`` workspace, and the method's decode (momentum and output copy).
    """

    def __init__(
        self, method: str, compressor: str, density: float, detach: float, segments: tuple[Segment, ...]
    ) -> None:
        self.method = build_method(method, build_compressor(compressor, density=density), detach=detach)
        numels = [s.numel for s in segments]
        table = ParameterTable(
            names=tuple(f"p{i}" for i in range(len(numels))),
            shapes=tuple(torch.Size([n]) for n in numels),
            groups=(0,) * len(numels),
        )
        self.worker = WorkerState(self.method, table, DEVICE, rank=0, seed=0)
        self.bucket = self.worker.bucket(tuple(range(len(numels))))
        self.grad = torch.empty(self.bucket.numel, device=DEVICE)
        self.hypers = [GroupHyper(lr=0.1, prev_lr=0.1, momentum=0.9, weight_decay=0.0)]
        self.t = 0

    def step(self) -> None:
        step = BucketStep(
            bucket=self.bucket,
            grad=self.grad,
            out=self.grad,
            hypers=self.hypers,
            step=self.t,
            rng=self.worker.rng,
            world_size=1,
            read_params=lambda out: None,
        )
        messages = self.method.encode(step)
        means = []
        for index, message in enumerate(messages):
            mean = self.bucket.workspace(f"mean{index}", message.plan.numel)
            mean = message.decode_into if message.decode_into is not None else mean
            decode_mean(message.compressor, message.plan, [message.payload], mean)
            means.append(mean)
        self.method.decode(step, means)
        self.t += 1


def run_layout(name: str, numel: int, rounds: int, warmup: int) -> None:
    """Print the compressor table and the pipeline table of one layout."""
    segments = layout(name, numel)
    d = sum(s.numel for s in segments)
    torch.manual_seed(0)
    x = torch.randn(d, device=DEVICE)
    buf = torch.empty(d, device=DEVICE)
    work = torch.empty(d, device=DEVICE)
    out = torch.zeros(d, device=DEVICE)
    absx = torch.empty(d, device=DEVICE)
    print(f"\n### Layout `{name}`: {len(segments)} segments, d = {d:,} fp32 ({4 * d / 2**20:.0f} MiB)\n")

    ops = [Arm("copy_ (preallocated)", lambda: buf.copy_(x)), Arm("clone() (allocating)", lambda: x.clone())]
    for density in DENSITIES:
        k = max(1, int(density * d))
        ops.append(
            Arm(
                f"torch.topk(|x|) {density:.1%}",
                lambda k=k: torch.topk(torch.abs(x, out=absx), k, sorted=False),
            )
        )
    ops += compressor_ops("none", 1.0, x, work, out, segments)
    for comp in SPARSIFIERS[1:]:
        for density in DENSITIES:
            ops += compressor_ops(comp, density, x, work, out, segments)
    med = medians(interleaved(ops, rounds, warmup, device=DEVICE))
    copy = med["copy_ (preallocated)"]
    print("| Op | median ms | × copy_ | × torch.topk (same k) |")
    print("|---|---:|---:|---:|")
    for op in ops:
        ms = med[op.name] * 1e3
        ref = ""
        if op.name.startswith(("topk ", "topk_approx ")) and "compress+" in op.name:
            density = 0.01 if " 1.0%" in op.name else 0.001
            ref = f"{med[op.name] / med[f'torch.topk(|x|) {density:.1%}']:.3f}"
        print(f"| {op.name} | {ms:.2f} | {med[op.name] / copy:.3f} | {ref} |")

    # Full per-bucket GMC pipeline of one worker.
    configs = [
        ("GMC, none (dense)", "gmc", "none", 1.0, 0.0),
        ("GMC, topk_approx 1%", "gmc", "topk_approx", 0.01, 0.0),
        ("GMC, topk 1%", "gmc", "topk", 0.01, 0.0),
        ("GMC+, rbgs 1% (detach 0.5)", "gmc", "rbgs", 0.01, 0.5),
        ("GMC, topk_approx 0.1%", "gmc", "topk_approx", 0.001, 0.0),
        ("GMC+, rbgs 0.1% (detach 0.5)", "gmc", "rbgs", 0.001, 0.5),
    ]
    pipes = {label: Pipeline(m, c, dens, det, segments) for label, m, c, dens, det in configs}
    pops = [Arm("copy_ (preallocated)", lambda: buf.copy_(x)), Arm("clone() (allocating)", lambda: x.clone())]
    for label, pipe in pipes.items():
        pops.append(Arm(label, pipe.step, setup=lambda pipe=pipe: pipe.grad.copy_(x)))
    pmed = medians(interleaved(pops, rounds, warmup, device=DEVICE))
    print("\nPer-bucket GMC pipeline, one worker (encode + local decode + method decode):\n")
    print(
        "| Pipeline | median ms | × copy_ | × clone() | d-sized allocations per step "
        "| MiB allocated per step |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, pipe in pipes.items():
        large_s, mib_s = "n/a", "n/a"  # the profiler's memory counts are CPU allocations
        if DEVICE.type == "cpu":
            pipe.grad.copy_(x)
            pipe.step()  # the profiled step is a steady-state one
            pipe.grad.copy_(x)
            large, mib = large_allocations(pipe.step, d // 2)
            large_s, mib_s = str(large), f"{mib:.1f}"
        ratio = pmed[label] / pmed["copy_ (preallocated)"]
        vs_clone = pmed[label] / pmed["clone() (allocating)"]
        print(f"| {label} | {pmed[label] * 1e3:.2f} | {ratio:.2f} | {vs_clone:.2f} | {large_s} | {mib_s} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=25_000_000, help="elements of the flat gradient")
    parser.add_argument("--quick", action="store_true", help="d = 1M and fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 9, quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--layout", choices=("single", "resnet50", "both"), default="both")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    numel = 1_000_000 if args.quick else args.numel
    rounds = args.rounds or (3 if args.quick else 9)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__} on {where}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, "
        f"{args.threads} thread(s); load average before: {load_average()}; "
        f"{rounds} interleaved rounds (+{args.warmup} warm-up), median"
    )
    for name in ("single", "resnet50") if args.layout == "both" else (args.layout,):
        run_layout(name, numel, rounds, args.warmup)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
