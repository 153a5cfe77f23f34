"""A projection (not a measurement): where compression pays on GPU clusters, by the planner's cost model.

For GPT-3 Small (125M), GPT-3 XL (1.3B) and LLaMA-7B (``lightning_gmc.plan.models.PRESETS``), 8 to
256 nodes of 8 H100 (SXM) each, 10 to 400 Gbit/s between nodes per node, NVLink 450 GB/s per GPU
inside a node (and 3.2 Tbit/s: 8 x 400G, a DGX H100's NICs): the fastest arm the planner predicts and
its step time as a multiple of DDP's, and GMC ``topk_approx``'s (an all-gather, which grows with the
number of workers until the exchange falls back to the dense all-reduce).

Stated inputs (change them with the options):

* compute per step per GPU = 6 * parameters * tokens / (peak * MFU) (Kaplan et al. 2020's 6N FLOPs per
  token): 16,384 tokens per GPU per step, H100 SXM BF16 dense peak 989 TFLOPS (NVIDIA's datasheet),
  MFU 40 % (Llama 3's pre-training reported 38-43 % on H100: Llama Team, "The Llama 3 Herd of
  Models", 2024, Table 4);
* per-element costs: the shipped ``h100`` profile, derived from HBM bandwidth (not measured);
* collective latency 30 us (the profile's assumption), 5 us per hop between nodes, 1 us inside;
* gradients in fp32 (DDP's all-reduce of 4 bytes per parameter), DDP's 25 MiB buckets;
* ``overlap``: the share of compute that communication hides under; 0 (nothing hidden) and 2/3 (all
  of the backward pass) bracket DDP's real overlap;
* one density, 1 % (the library's default): per step at equal step counts, a lower density always
  sends less, but needs more steps to the same accuracy, which the cost model does not know.

    python benchmarks/plan_projection.py                # both overlap values, markdown
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gmc.plan import Cluster, ddp_buckets, default_arms, load_profile, predict  # noqa: E402
from lightning_gmc.plan.models import PRESETS  # noqa: E402
from lightning_gmc.plan.traffic import arm_traffic  # noqa: E402

PEAK_FLOPS = 989e12
MODELS = ("gpt-125m", "gpt-1.3b", "llama-7b")
NODES = (8, 16, 32, 64, 128, 256)
RATES_GBIT = (10, 25, 100, 400, 3200)


def compute_seconds(params: int, tokens: int, mfu: float) -> float:
    return 6.0 * params * tokens / (PEAK_FLOPS * mfu)


def project(args: argparse.Namespace, overlap: float) -> str:
    profile = load_profile(args.profile)
    lines = []
    for model in args.models:
        description, tensors = PRESETS[model]
        numels = list(tensors())
        buckets = ddp_buckets(numels)
        compute = compute_seconds(sum(numels), args.tokens, args.mfu)
        lines += [
            f"\n#### {description}: {sum(numels) / 1e9:.2f}B parameters, compute {compute * 1e3:.0f} ms "
            f"per step, overlap {overlap:.2f}\n",
            "| nodes x 8 GPUs | " + " | ".join(f"{r:g} Gbit/s" for r in args.rates) + " |",
            "|---|" + "---:|" * len(args.rates),
        ]
        gathered = [
            f"\nGMC topk_approx 1 % (flat, all-gather) x DDP, {description}, overlap {overlap:.2f}:\n",
            "| nodes x 8 GPUs | " + " | ".join(f"{r:g} Gbit/s" for r in args.rates) + " |",
            "|---|" + "---:|" * len(args.rates),
        ]
        for nodes in args.nodes:
            arms = default_arms(profile, nodes, args.gpus, densities=args.densities)
            traffic = {arm: arm_traffic(arm, numels, buckets, nodes, args.gpus) for arm in arms}
            cells, topk = [], []
            for rate in args.rates:
                cluster = Cluster(
                    nodes=nodes,
                    ranks_per_node=args.gpus,
                    inter_bps=rate * 1e9,
                    intra_bps=args.nvlink_gbyte * 8e9,
                    inter_latency_s=5e-6,
                    intra_latency_s=1e-6,
                )
                steps = {
                    a: predict(a, numels, cluster, compute, profile, overlap=overlap, traffic=t)
                    for a, t in traffic.items()
                }
                ddp = next(p for a, p in steps.items() if a.method == "ddp")
                best = min(steps.values(), key=lambda p: p.step_s)
                cells.append(
                    f"DDP ({ddp.step_s * 1e3:.0f} ms)"
                    if best is ddp
                    else f"{best.arm.label} {best.step_s / ddp.step_s:.2f}"
                )
                approx = next(
                    p
                    for a, p in steps.items()
                    if a.compressor == "topk_approx" and a.method == "gmc" and a.hierarchy == "flat"
                )
                route = "dense" if "dense" in approx.traffic.routes else "gather"
                topk.append(f"{approx.step_s / ddp.step_s:.2f} ({route})")
            lines.append(f"| {nodes} | " + " | ".join(cells) + " |")
            gathered.append(f"| {nodes} | " + " | ".join(topk) + " |")
        lines += gathered
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(PRESETS))
    p.add_argument("--nodes", type=int, nargs="+", default=list(NODES))
    p.add_argument("--rates", type=float, nargs="+", default=list(RATES_GBIT), help="Gbit/s per node")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nvlink-gbyte", type=float, default=450.0, help="GB/s per GPU inside a node, one way")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per GPU per step")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--profile", default="h100")
    p.add_argument("--overlap", type=float, nargs="+", default=[0.0, 2 / 3])
    p.add_argument(
        "--densities",
        type=float,
        nargs="+",
        default=[0.01],
        help="compressed densities compared (at equal steps the lowest always sends least: compare at one)",
    )
    args = p.parse_args(argv)
    print("PROJECTION (cost model, not measured): the fastest arm and its step as a multiple of DDP's")
    for overlap in args.overlap:
        print(project(args, overlap))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
