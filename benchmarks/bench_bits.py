"""Bits versus error for every bit-budget compressor, beside the lower bound.

For ``d = 2^20`` (``--d``) and several bit budgets per compressor this measures, by Monte Carlo:

* the normalized error ``E||C(x) - x||^2 / ||x||^2`` on Gaussian ``x``, for unbiased
  compressors after the error-feedback scaling ``1/(1+omega)``, against the lower bound
  ``4^(-r)`` (both in ``docs/compressors.md``), ``r = payload_bits / d``;
* for unbiased compressors, the variance parameter ``omega`` on Gaussian ``x`` and the largest one
  over adversarial inputs (flat, TernGrad's worst case, natural compression's worst case)
  against the bound ``1 / (4^r - 1)``;
* encode and decode time as a ratio of a preallocated ``copy_`` of the same vector, measured in
  interleaved rounds in the same run.

Prints a markdown table and writes a PNG plot (matplotlib, Agg backend)::

    python benchmarks/bench_bits.py            # full run, writes docs/bits_vs_error.png
    python benchmarks/bench_bits.py --quick    # fewer budgets and trials
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from harness import Arm, interleaved, medians

from lightning_gmc.compressors import (
    Compressor,
    NaturalCompression,
    NaturalDithering,
    RandomDithering,
    RandomStreams,
    ScaledSign,
    SparseDithering,
    SphericalCompression,
    TernGrad,
    TopK,
    segments_from_numels,
)
from lightning_gmc.compressors.bounds import epsilon_lower_bound, omega_lower_bound


@dataclass
class Row:
    family: str
    label: str
    compressor: Compressor
    bits_per_coord: float = 0.0
    omega_theory: float | None = None
    delta_theory: float | None = None
    omega_gauss: float | None = None
    omega_worst: float | None = None
    eps_gauss: float = 0.0
    delta_measured: float | None = None
    encode_ratio: float = 0.0
    decode_ratio: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def configs(quick: bool) -> list[tuple[str, str, Compressor]]:
    out: list[tuple[str, str, Compressor]] = []
    sd = [0.01, 0.25, 1.0, 4.0] if quick else [0.001, 0.01, 1 / 16, 0.25, 0.5, 1.0, 4.0, 16.0]
    for dens in sd:
        out.append(("SD-l1 (sd_l1)", f"s={dens:g}d", SparseDithering(density=dens)))
    for dens in [0.01, 0.25] if quick else [0.01, 0.25, 1.0]:
        out.append(("SD multinomial", f"s={dens:g}d", SparseDithering(density=dens, sampling="multinomial")))
    sc = [(16, 8, 8), (8, 8, 8)] if quick else [(32, 8, 8), (16, 8, 8), (16, 12, 8), (8, 8, 8), (8, 8, 32)]
    for k, b, nb in sc:
        out.append(
            ("SC-RC (spherical_rc)", f"k={k},B={b},norm={nb}b", SphericalCompression(k, b, norm_bits=nb))
        )
    contractive = SphericalCompression(16, 8, 8, variant="contractive")
    out.append(("SC-RC contractive", "k=16,B=8,norm=8b", contractive))
    for s in [1, 3] if quick else [1, 3, 15]:
        out.append(("QSGD (qsgd)", f"s={s}", RandomDithering(levels=s)))
    for s in [1] if quick else [1, 7]:
        out.append(("QSGD bucket 512", f"s={s}", RandomDithering(levels=s, block_size=512)))
    for s in [4] if quick else [2, 4, 8]:
        out.append(("natural dithering", f"s={s}", NaturalDithering(levels=s)))
    out.append(("natural (C_nat)", "9 bit", NaturalCompression()))
    out.append(("TernGrad", "", TernGrad()))
    out.append(("scaled sign", "", ScaledSign()))
    out.append(("scaled sign", "block 128", ScaledSign(block_size=128)))
    for dens in [0.01] if quick else [0.01, 1 / 16]:
        out.append(("top-k (existing)", f"k={dens:g}d", TopK(density=dens)))
    return out


def adversarial_inputs(d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Worst-case input families (the Gaussian input is measured separately)."""
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0)
    tern = signs / (math.sqrt(d) + 1)
    tern[0] = 1.0  # (1, a, ..., a), a = 1/(sqrt(d)+1): TernGrad's supremum of omega
    natural = signs * (4.0 / 3.0) * 2.0 ** torch.randint(-4, 4, (d,), generator=gen).float()
    return {"flat": signs, "terngrad_worst": tern, "natural_worst": natural}


def measure(c: Compressor, x: torch.Tensor, trials: int, rng: RandomStreams) -> tuple[float, float]:
    """Mean ``||C(x)-x||^2/||x||^2`` and mean ``||C(x)/(1+omega) - x||^2/||x||^2`` (or the former for
    biased compressors) over ``trials`` independent steps."""
    plan = c.plan(segments_from_numels([x.numel()]))
    scale = 1.0 / (1.0 + c.omega(x.numel())) if c.unbiased else 1.0  # type: ignore[attr-defined]
    norm2 = float(x.double().pow(2).sum())
    raw, scaled = [], []
    out = torch.zeros_like(x)
    for t in range(trials):
        out.zero_()
        c.decompress_add(c.compress(x, plan, rng, t), plan, out)
        raw.append(float((out.double() - x.double()).pow(2).sum()) / norm2)
        scaled.append(float((out.double() * scale - x.double()).pow(2).sum()) / norm2)
    return statistics.fmean(raw), statistics.fmean(scaled)


def timings(rows: list[Row], d: int, rounds: int) -> None:
    """Encode/decode medians over interleaved rounds, as ratios of a preallocated ``copy_``."""
    x = torch.randn(d, generator=torch.Generator().manual_seed(7))
    buf = torch.empty_like(x)
    rng = RandomStreams(0, 0)
    segments = segments_from_numels([d])
    arms = [Arm("copy_", lambda: buf.copy_(x))]
    for i, row in enumerate(rows):
        c = row.compressor
        plan = c.plan(segments)
        payload = c.compress(x, plan, rng, 0)
        out = torch.zeros_like(x)
        arms.append(Arm(f"enc{i}", partial(c.compress, x, plan, rng, 1)))
        arms.append(Arm(f"dec{i}", partial(c.decompress_add, payload, plan, out)))
    med = medians(interleaved(arms, rounds, warmup=1))
    for i, row in enumerate(rows):
        row.encode_ratio = med[f"enc{i}"] / med["copy_"]
        row.decode_ratio = med[f"dec{i}"] / med["copy_"]
        row.extra["copy_ms"] = med["copy_"] * 1e3
        row.extra["encode_ms"] = med[f"enc{i}"] * 1e3
        row.extra["decode_ms"] = med[f"dec{i}"] * 1e3


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"load average {load:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer budgets and trials")
    parser.add_argument("--d", type=int, default=1 << 20, help="vector size (default 2^20)")
    parser.add_argument("--trials", type=int, default=None, help="Monte Carlo draws per input")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    default_plot = Path(__file__).resolve().parents[1] / "docs" / "bits_vs_error.png"
    parser.add_argument("--plot", type=Path, default=default_plot, help="PNG output path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trials = args.trials or (2 if args.quick else 5)
    rounds = args.rounds or (3 if args.quick else 7)
    d = args.d
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(d, generator=gen)
    adversarial = adversarial_inputs(d, gen)
    rows: list[Row] = []
    t_start = time.perf_counter()
    for family, label, c in configs(args.quick):
        row = Row(family, label, c)
        plan = c.plan(segments_from_numels([d]))
        row.bits_per_coord = c.payload_bits(plan) / d
        rng = RandomStreams(1, 0)
        raw, scaled = measure(c, gauss, trials, rng)
        row.eps_gauss = scaled
        if c.unbiased:
            row.omega_theory = c.omega(d)  # type: ignore[attr-defined]
            row.omega_gauss = raw
            row.omega_worst = max([raw] + [measure(c, v, trials, rng)[0] for v in adversarial.values()])
        else:
            delta = getattr(c, "delta", None)
            row.delta_theory = delta(d) if delta is not None else getattr(c, "density", None)
            row.delta_measured = 1.0 - raw
        rows.append(row)
    mc_seconds = time.perf_counter() - t_start
    timings(rows, d, rounds)

    print(f"# bits vs error, d = {d}, {trials} draws per input, {rounds} timing rounds")
    print(f"machine: {machine()}; Monte Carlo took {mc_seconds:.0f} s\n")
    print(
        "| compressor | config | bits/coord r | omega (theory) | omega^ Gaussian | omega^ worst input "
        "| omega_LB = 1/(4^r-1) | omega^ worst / LB | eps Gaussian (EF-scaled) | eps_LB = 4^-r "
        "| encode / copy_ | decode / copy_ |"
    )
    print("|" + "---|" * 12)
    for r in rows:
        lb = omega_lower_bound(r.bits_per_coord)
        ratio = r.omega_worst / lb if r.omega_worst is not None else None
        theory = fmt(r.omega_theory) if r.omega_theory is not None else f"delta={fmt(r.delta_theory)}"
        print(
            f"| {r.family} | {r.label} | {fmt(r.bits_per_coord, 4)} | {theory} | {fmt(r.omega_gauss)} "
            f"| {fmt(r.omega_worst)} | {fmt(lb)} | {fmt(ratio)} | {fmt(r.eps_gauss)} "
            f"| {fmt(epsilon_lower_bound(r.bits_per_coord))} | {r.encode_ratio:.1f} | {r.decode_ratio:.1f} |"
        )
    copy_ms = rows[0].extra["copy_ms"]
    print(f"\ncopy_ of {d} floats: {copy_ms:.3f} ms (median); ratios above are medians / this.")
    plot(rows, args.plot, d)
    print(f"plot written to {args.plot}")


def plot(rows: list[Row], path: Path, d: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    families = list(dict.fromkeys(r.family for r in rows))
    markers = "os^vD<>pPX*hH"
    rmin = min(r.bits_per_coord for r in rows) * 0.7
    rmax = max(r.bits_per_coord for r in rows) * 1.3
    grid = [rmin * (rmax / rmin) ** (i / 200) for i in range(201)]
    ax1.plot(grid, [epsilon_lower_bound(g) for g in grid], "k-", lw=2, label="lower bound $4^{-r}$")
    ax2.plot(grid, [omega_lower_bound(g) for g in grid], "k-", lw=2, label="lower bound $1/(4^r-1)$")
    for i, fam in enumerate(families):
        pts = sorted((r for r in rows if r.family == fam), key=lambda r: r.bits_per_coord)
        m = markers[i % len(markers)]
        ax1.plot([r.bits_per_coord for r in pts], [r.eps_gauss for r in pts], marker=m, ls="--", label=fam)
        unb = [r for r in pts if r.omega_worst is not None]
        if unb:
            xs, ys = [r.bits_per_coord for r in unb], [r.omega_worst for r in unb]
            ax2.plot(xs, ys, marker=m, ls="--", label=fam)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("bits per coordinate r (all bits counted)")
    ax1.set_ylabel("normalized error E||C(x)-x||²/||x||² (Gaussian x; unbiased: C/(1+ω))")
    ax1.set_title(f"average case, d = 2^{int(math.log2(d))}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("bits per coordinate r (all bits counted)")
    ax2.set_ylabel("measured ω, worst of the adversarial inputs")
    ax2.set_title("worst case, unbiased compressors")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    # Frame the measurements: the bounds fall off as 4^-r and would otherwise squash every measured
    # point into the top decade of the plot.
    eps = [r.eps_gauss for r in rows if r.eps_gauss > 0]
    omegas = [r.omega_worst for r in rows if r.omega_worst is not None and r.omega_worst > 0]
    ax1.set_ylim(min(eps) / 5, 2.0)
    if omegas:
        ax2.set_ylim(min(omegas) / 5, max(omegas) * 5)
    ax1.legend(fontsize=7, loc="lower left")
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
