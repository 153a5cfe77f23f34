"""The non-IID study's outputs: the Markdown table of final accuracies (``results.md``) and the
accuracy curves per suite (``curves_<suite>.png``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from examples.noniid_arms import REFERENCE

__all__ = ["plot", "write_markdown"]


def _stats(values: list[float]) -> tuple[float, float]:
    array = np.array(values)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _cost_line(results: dict[str, list[dict[str, Any]]], labels: list[str]) -> str:
    """Whether equal density is also equal cost here: the spread of the compressed arms' measured RCC."""
    costs = {label: float(np.mean([r["rcc"] for r in results[label]])) for label in labels}
    compressed = [rcc for rcc in costs.values() if rcc < 0.999]
    if not compressed:
        return ""
    low, high = min(compressed), max(compressed)
    verdict = "equal cost within that spread" if high / low < 1.15 else "NOT equal cost: read the RCC column"
    return (
        f"Cost: the compressed arms' measured RCC spans {low * 100:.2f}% to {high * 100:.2f}% "
        f"(the largest {high / low:.2f}x the smallest), so equal density is also {verdict}."
    )


def write_markdown(
    args: argparse.Namespace,
    results: dict[str, list[dict[str, Any]]],
    groups: dict[str, list[str]],
    fingerprints: dict[int, dict[str, Any]],
    command: str,
) -> None:
    lines = [
        "# Non-IID study on digits",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"K = {args.workers} simulated workers, Dirichlet alpha = {args.alpha} (Lin et al. split), "
        f"DigitsCNN, {args.epochs} epochs, batch {args.batch_size} per worker, SGD lr {args.lr} "
        f"(cosine per epoch), momentum {args.momentum}, weight decay {args.weight_decay}, seeds "
        f"{args.seeds}. Density {args.density} for every compressed method of a suite. Final test "
        "accuracy and loss on the 357 held-out digits (one digit = 0.28 points), evaluated on each "
        "method's evaluation model (CSER: the average of the workers' models; DEF-A: x - mean error; "
        "the others: w_t). The seed moves the partition, the initialisation, the batch order and the "
        "compressors' random streams of every arm (fingerprints in `results.json`).",
    ]
    titles = {
        "topk": "Top-k suite (CSER: rho1 = density/2, rho2 = 4 density, H = 8)",
        "rbgs": "RBGS suite (one random block per parameter, equal RCC)",
        "adamw": f"AdamW suite (lr {args.adamw_lr}, cosine per epoch, decoupled weight decay "
        f"{args.adamw_weight_decay}; ef = error feedback on the gradient)",
    }
    for suite, labels in groups.items():
        if not labels:
            continue
        reference = REFERENCE.get(suite) if REFERENCE.get(suite) in labels else None
        lines += ["", f"## {titles.get(suite, suite)}", ""]
        if reference is not None:
            lines += [
                f"Paired column: the final accuracy minus that of **{reference}** with the same seed, mean "
                "over seeds, and on how many seeds the arm was higher / equal / lower.",
                "",
            ]
        lines += [
            "| method | test accuracy (mean ± std) | min | max | per seed | paired vs reference | "
            "test loss (mean ± std) | RCC |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in labels:
            runs = results[label]
            finals = [r["curve"][-1] * 100 for r in runs]
            acc, acc_sd = _stats(finals)
            loss, loss_sd = _stats([r["test_loss"][-1] for r in runs])
            rcc, _ = _stats([r["rcc"] for r in runs])
            per_seed = ", ".join(f"{a:.2f}" for a in finals)
            paired = "–"
            if reference is not None and label != reference:
                diffs = [a - r["curve"][-1] * 100 for a, r in zip(finals, results[reference], strict=True)]
                counts = [sum(d > 1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs)]
                counts.append(len(diffs) - sum(counts))
                paired = f"{np.mean(diffs):+.2f} ({'/'.join(map(str, counts))})"
            lines.append(
                f"| {label} | {acc:.2f}% ± {acc_sd:.2f} | {min(finals):.2f}% | {max(finals):.2f}% | "
                f"{per_seed} | {paired} | {loss:.3g} ± {loss_sd:.3g} | {rcc * 100:.2f}% |"
            )
        lines += ["", _cost_line(results, labels)]
        lines += ["", f"![test accuracy per epoch, {suite}](curves_{suite}.png)"]
    lines += ["", "Per-seed fingerprints (initial-model checksum, worker 0's first batch):", ""]
    for seed, fp in fingerprints.items():
        first = fp["first_batch_worker0"]
        lines.append(f"- seed {seed}: init {fp['init_checksum']:.4f}, first batch {first}")
    lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))


def plot(
    results: dict[str, list[dict[str, Any]]],
    arms: dict[str, dict[str, Any]],
    path: Path,
    args: argparse.Namespace,
    suite: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour family per method when a suite sweeps a method's coefficient, distinct colours
    # otherwise; the dense baseline is black.
    families: dict[str, list[str]] = {}
    for label in results:
        families.setdefault(arms[label]["method"], []).append(label)
    colors: dict[str, Any] = {}
    styles: dict[str, str] = {}
    sweep = any(len(members) > 1 for members in families.values())
    maps = iter(["Blues", "Reds", "Greens", "Purples", "Oranges", "Greys"])
    palette = iter(plt.get_cmap("tab10")(np.arange(10)))
    for method, members in families.items():
        cmap = plt.get_cmap(next(maps)) if sweep and len(members) > 1 else None
        for i, label in enumerate(members):
            if method == "dmsgd":
                colors[label] = "black"
            elif cmap is not None:
                colors[label] = cmap(0.45 + 0.55 * i / max(len(members) - 1, 1))
            else:
                colors[label] = next(palette)
            styles[label] = ("-", "--", "-.", ":")[i % 4] if cmap is not None else "-"

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, runs in results.items():
        curves = np.array([r["curve"] for r in runs]) * 100
        epochs = np.arange(1, curves.shape[1] + 1)
        color = colors[label]
        ax.plot(epochs, curves.mean(0), label=label, color=color, linestyle=styles[label])
        if len(runs) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.06, color=color)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"digits, K={args.workers}, Dirichlet {args.alpha}, {suite} density {args.density}: "
        "mean over seeds (band: min-max)",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
