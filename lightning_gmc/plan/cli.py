"""``python -m lightning_gmc.plan``: will compression pay on this cluster, and with which settings?

::

    python -m lightning_gmc.plan --model gpt-1.3b --nodes 32 --ranks-per-node 8 \\
        --inter-bw 100gbit --intra-bw 3600gbit --compute-ms 161 --profile h100
    python -m lightning_gmc.plan --params 1.06e6 --nodes 2 --inter-bw 100mbit --compute-ms 25
    python -m lightning_gmc.plan --model mypkg.models:MyModule --measure --input-shape 32 64 ...
    python -m lightning_gmc.plan --calibrate my_gpu.json    # time this device; then --profile my_gpu.json

Prints the predicted step of DDP, DDP with torch's bf16 hook and each method x compressor x density x
hierarchy, fastest first (``*``), with the inter-node rate below which each arm beats DDP. This module
is the command line's own output, so it prints; the library itself logs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_gmc.plan.arms import DEFAULT_COMPRESSORS, DEFAULT_DENSITIES, default_arms
from lightning_gmc.plan.cost import Cluster, Prediction, plan
from lightning_gmc.plan.models import (
    PRESETS,
    ModelShape,
    from_checkpoint,
    from_import_path,
    measure_compute,
    module_factory,
    parse_kwargs,
    parse_sizes,
)
from lightning_gmc.plan.profile import load_profile, shipped_profiles
from lightning_gmc.plan.traffic import ddp_buckets

__all__ = ["GPU_SPECS", "format_rate", "main", "parse_rate", "table"]

#: name -> (memory bytes/s, where the figure is from): NVIDIA's H100 and H200 datasheets (SXM)
GPU_SPECS = {
    "h100": (3.35e12, ", H100 SXM HBM3 per NVIDIA's datasheet"),
    "h200": (4.8e12, ", H200 SXM HBM3e per NVIDIA's datasheet"),
}
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(text: str) -> float:
    """``"100mbit"``, ``"10gbit"``, ``"1.5g"``, ``"3e9"`` -> bits per second."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(?:bit|bps|b)?(?:/s)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 100mbit, 10gbit, 3.6tbit)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_rate(bps: float | None) -> str:
    """Bits per second for a table (``"12 Gbit/s"``; ``"any"`` for inf, ``"never"`` for 0)."""
    if bps is None:
        return ""
    if math.isinf(bps):
        return "any rate"
    if bps <= 0:
        return "never"
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


def _bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def table(predictions: Sequence[Prediction]) -> str:
    """The markdown table of predictions (fastest first, marked ``*``): step time, its multiple of
    DDP's, communication and pipeline time, bytes each rank sends (inside the node too under
    ``hierarchy="node"``) and a node sends to the others, RCC, and the crossover rate."""
    ddp = next(p for p in predictions if p.arm.method == "ddp")
    rows = [
        "| | arm | step ms | x DDP | comm ms | pipeline ms | bytes/rank | between nodes, per node | RCC "
        "| faster than DDP below |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, p in enumerate(predictions):
        rcc = f"{p.traffic.rcc:.4f}" + ("" if p.traffic.rcc_exact else " max")
        mark = "*" if index == 0 else ""
        crossover = format_rate(p.crossover_bps) if p is not ddp else ""
        rows.append(
            f"| {mark} | {p.arm.label} | {p.step_s * 1e3:.1f} | {p.step_s / ddp.step_s:.3f} | "
            f"{p.comm_s * 1e3:.1f} | {p.pipeline_s * 1e3:.1f} | {_bytes(p.traffic.bytes_sent)} | "
            f"{_bytes(p.traffic.inter_node_bytes)} | {rcc} | {crossover} |"
        )
    return "\n".join(rows)


def _model(args: argparse.Namespace) -> tuple[ModelShape, torch.nn.Module | None]:
    if args.params is not None:
        return ModelShape.from_count(args.params), None
    if args.tensor_sizes:
        return parse_sizes(args.tensor_sizes), None
    if args.checkpoint is not None:
        return from_checkpoint(args.checkpoint), None
    if args.model in PRESETS:
        description, tensors = PRESETS[args.model]
        return ModelShape(description, tensors()), None
    return from_import_path(args.model, parse_kwargs(args.model_args))


def _compute_seconds(args: argparse.Namespace, module: torch.nn.Module | None) -> tuple[float, str]:
    if not args.measure:
        return args.compute_ms / 1e3, "given"
    if module is None:
        raise SystemExit("--measure needs --model pkg.module:Class (a module to run); or give --compute-ms")
    example = getattr(module, "example_input_array", None)
    if args.input_shape:
        shape = tuple(args.input_shape)
    elif isinstance(example, torch.Tensor):
        shape = tuple(example.shape)
    else:
        raise SystemExit("--measure needs --input-shape (or the module's example_input_array)")
    factory = module_factory(args.model, parse_kwargs(args.model_args))
    seconds = measure_compute(factory, torch.randn(*shape))
    return seconds, f"measured here ({torch.get_num_threads()} threads, input {list(shape)})"


def _calibrate(args: argparse.Namespace) -> int:
    from lightning_gmc.plan.calibrate import calibrate, derive_gpu_profile

    out = Path(args.calibrate)
    profile = calibrate()
    out.write_text(profile.to_json() + "\n")
    print(f"wrote {out}: {profile.source}")
    if args.derive_gpu:
        for name, (rate, spec) in GPU_SPECS.items():
            derived = derive_gpu_profile(profile, name, rate, spec=spec)
            path = out.with_name(f"{name}.json")
            path.write_text(derived.to_json() + "\n")
            print(f"wrote {path}: {derived.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_gmc.plan", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--params", type=float, help="parameter count (e.g. 1.3e9)")
    what.add_argument(
        "--tensor-sizes", nargs="+", metavar="SIZE", help="per-tensor sizes or shapes (4096x4096)"
    )
    what.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or pkg.module:Class")
    what.add_argument("--checkpoint", help="a checkpoint file to read tensor shapes from")
    p.add_argument("--model-args", help="JSON keyword arguments for --model pkg.module:Class")
    p.add_argument("--nodes", type=int, default=2, help="N (default 2)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="G (default 1)")
    p.add_argument("--inter-bw", type=parse_rate, default=parse_rate("1gbit"), help="between nodes, per node")
    p.add_argument("--intra-bw", type=parse_rate, default=parse_rate("1tbit"), help="inside a node, per rank")
    p.add_argument("--inter-latency-us", type=float, default=20.0, help="per hop between nodes")
    p.add_argument("--intra-latency-us", type=float, default=2.0, help="per hop inside a node")
    p.add_argument(
        "--efficiency", type=float, default=Cluster.efficiency, help="payload share of the line rate"
    )
    p.add_argument("--compute-ms", type=float, help="forward + backward + optimizer step per rank")
    p.add_argument("--measure", action="store_true", help="measure the compute time here (--model Class)")
    p.add_argument("--input-shape", type=int, nargs="+", help="input of --measure, batch first")
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of compute communication hides under")
    p.add_argument("--profile", default="cpu", help=f"{', '.join(shipped_profiles())} or a --calibrate JSON")
    p.add_argument("--methods", nargs="+", default=["gmc", "gmc+", "ef"], help="gmc, gmc+, ef, ...")
    p.add_argument("--compressors", nargs="+", default=list(DEFAULT_COMPRESSORS))
    p.add_argument("--densities", type=float, nargs="+", default=list(DEFAULT_DENSITIES))
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket_cap_mb")
    p.add_argument("--top", type=int, default=0, help="print only the fastest N arms (0: all)")
    p.add_argument("--json", type=Path, help="also write the predictions here")
    p.add_argument("--calibrate", metavar="FILE", help="time this device, write its profile to FILE, exit")
    p.add_argument(
        "--derive-gpu", action="store_true", help=f"with --calibrate: also {', '.join(GPU_SPECS)}.json"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the planner; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.calibrate:
        return _calibrate(args)
    if args.params is None and not args.tensor_sizes and args.model is None and args.checkpoint is None:
        print("error: give the model: --params, --tensor-sizes, --model or --checkpoint", file=sys.stderr)
        return 2
    if args.compute_ms is None and not args.measure:
        print("error: give --compute-ms (forward + backward + step) or --measure", file=sys.stderr)
        return 2
    try:
        profile = load_profile(args.profile)
        model, module = _model(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    compute_s, how = _compute_seconds(args, module)
    cluster = Cluster(
        nodes=args.nodes,
        ranks_per_node=args.ranks_per_node,
        inter_bps=args.inter_bw,
        intra_bps=args.intra_bw,
        inter_latency_s=args.inter_latency_us * 1e-6,
        intra_latency_s=args.intra_latency_us * 1e-6,
        efficiency=args.efficiency,
    )
    arms = default_arms(
        profile, args.nodes, args.ranks_per_node, args.methods, args.compressors, args.densities
    )
    buckets = ddp_buckets(model.numels, args.bucket_cap_mb)
    predictions = plan(model.numels, cluster, compute_s, profile, arms, buckets, args.overlap)
    source = profile.source if len(profile.source) < 160 else profile.source[:157] + "..."
    print(
        f"model: {model.name} ({model.numel:,} parameters in {len(model.numels)} tensors), "
        f"{len(buckets)} DDP buckets of <= {args.bucket_cap_mb:g} MiB\n"
        f"cluster: {args.nodes} nodes x {args.ranks_per_node} ranks; between nodes "
        f"{format_rate(args.inter_bw)} per node, {args.inter_latency_us:g} us per hop; inside a node "
        f"{format_rate(args.intra_bw)} per rank; efficiency {args.efficiency:.3f}; overlap {args.overlap:g}\n"
        f"compute: {compute_s * 1e3:.1f} ms per step ({how})\n"
        f"profile: {profile.name} ({source})\n"
    )
    shown = predictions[: args.top] if args.top else predictions
    if not any(p.arm.method == "ddp" for p in shown):
        shown = [*shown, next(p for p in predictions if p.arm.method == "ddp")]
    print(table(shown))
    print(
        "\nPer step, at equal step counts: compression changes how many steps a target accuracy takes "
        "(docs/planner.md). RCC 'max': all-gathered supports counted as disjoint."
    )
    if args.json is not None:
        args.json.write_text(json.dumps([_record(p) for p in predictions], indent=1))
    return 0


def _record(p: Prediction) -> dict[str, object]:
    return {
        "arm": p.arm.label,
        "method": p.arm.method,
        "compressor": p.arm.compressor,
        "density": p.arm.density,
        "detach": p.arm.detach,
        "hierarchy": p.arm.hierarchy,
        "step_s": p.step_s,
        "compute_s": p.compute_s,
        "pipeline_s": p.pipeline_s,
        "comm_s": p.comm_s,
        "bytes_sent": p.traffic.bytes_sent,
        "inter_node_bytes": p.traffic.inter_node_bytes,
        "intra_bytes": p.traffic.intra_bytes,
        "rcc": p.traffic.rcc,
        "crossover_bps": p.crossover_bps,
    }
