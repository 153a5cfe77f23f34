"""How far EF21's aggregate drifts from the mean of the workers' estimates in a real run.

EF21 keeps ``h = mean_k h_k`` by construction: every worker adds its own ``c_k`` to ``h_k`` and the
mean of all ``c_j`` to ``h``. The two sides are separate fp32 additions, so rounding makes them drift
apart; a checkpoint whose gap exceeds ``MEAN_INVARIANT_RTOL`` (``lightning_gmc.hook.checkpoint_schema``)
is refused at load. This script measures the gap, per parameter ``||h - mean_k h_k|| / max(||h||,
max_k ||h_k||)`` (float64), its maximum over the run's checkpoints (every 100 steps), for each
compressor and wire dtype, on K workers of a non-IID linear-regression-like problem in the simulator.
With a 16-bit wire the all-reduce routes (``rbgs``, ``randk``, ``none``) sum the ranks' values in 16
bits, so the aggregate drifts by ~2^-8 of a step's sum per step: the load check skips those
configurations.

    python benchmarks/bench_ef21_drift.py --steps 2000 --workers 4
"""

from __future__ import annotations

import argparse

import torch

from lightning_gmc import Simulator
from lightning_gmc.hook.checkpoint_schema import MEAN_INVARIANT_RTOL

SHAPES = {"w": (64, 32), "b": (32,)}
CASES = [
    ("topk", "fp32"),
    ("topk", "bf16"),
    ("rbgs", "fp32"),
    ("rbgs", "bf16"),
    ("rbgs", "fp16"),
    ("randk", "fp32"),
    ("randk", "bf16"),
    ("none", "fp32"),
    ("none", "bf16"),
    ("qsgd", "fp32"),
    ("scaled_sign", "fp32"),
]


def gap(sim: Simulator) -> float:
    worst = 0.0
    for index in range(len(SHAPES)):
        kept = sim.workers[0].tensors["aggregate"][index].double()
        parts = [w.tensors["estimate"][index].double() for w in sim.workers]
        scale = max(float(kept.norm()), *(float(p.norm()) for p in parts))
        worst = max(worst, float((kept - sum(parts) / len(parts)).norm()) / scale)
    return worst


def run(compressor: str, wire_dtype: str, workers: int, steps: int) -> float:
    sim = Simulator(
        SHAPES, workers, method="ef21", compressor=compressor, density=0.05, wire_dtype=wire_dtype
    )
    gen = torch.Generator().manual_seed(1)
    centres = [torch.randn(64, generator=gen) * (k + 1) for k in range(workers)]  # non-IID workers
    w = torch.zeros(SHAPES["w"])
    worst = 0.0
    for t in range(steps):
        grads = []
        for k in range(workers):
            x = torch.randn(64, generator=gen) + centres[k]
            g = torch.outer(x, torch.randn(32, generator=gen)) * 0.1 + 0.01 * w
            grads.append({"w": g, "b": torch.randn(32, generator=gen) + k})
        points = [{"w": w, "b": torch.zeros(32)}] * workers
        w = w - 0.01 * sim.step(grads, points, 0.01)[0]["w"]
        if t % 100 == 99 or t == steps - 1:
            worst = max(worst, gap(sim))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"EF21, {args.workers} workers, {args.steps} steps, density 0.05: max relative gap "
        f"||h - mean_k h_k|| / max norm (load check: {MEAN_INVARIANT_RTOL:g}, fp32 wires only)",
        "",
        "| compressor | wire_dtype | max relative gap |",
        "|---|---|---|",
    ]
    for compressor, wire_dtype in CASES:
        lines.append(
            f"| {compressor} | {wire_dtype} | {run(compressor, wire_dtype, args.workers, args.steps):.2g} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
