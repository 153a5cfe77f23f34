"""Non-IID study on scikit-learn's digits: K simulated workers, Dirichlet(alpha) split, every method.

Runs every method of ``lightning_gmc`` on the same data, model, schedule and seeds with
:class:`lightning_gmc.Simulator` (K virtual workers in one process, the same method and compressor code
as the DDP hook), at matched communication: the top-k methods all use the same density, CSER splits
it between its two compressors following Xie et al.'s pattern ``rho2 / H = rho1``, and the measured RCC
of every run is reported next to its accuracy. Nothing here is tuned per method: one learning rate,
one schedule, one density for all.

Writes to ``--out`` (default ``docs/study``): ``results.md`` (mean and spread of the final test
accuracy and of RCC over seeds, with the command that produced it), ``results.json`` (every curve) and
``curves.png`` (test accuracy per epoch, mean over seeds).

    python examples/noniid_study.py                 # the committed results (a few minutes on 2 cores)
    python examples/noniid_study.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.data import DigitsDataModule  # noqa: E402
from examples.models import DigitsCNN  # noqa: E402
from lightning_gmc import Simulator  # noqa: E402


def method_table(density: float) -> dict[str, dict[str, Any]]:
    """Every method at the same per-step density (CSER: split across its two compressors)."""
    return {
        "DMSGD (dense)": {"method": "dmsgd"},
        "DGC (w/ mfm)": {"method": "dgc", "compressor": "topk", "momentum_masking": True},
        "DGC (w/o mfm)": {"method": "dgc", "compressor": "topk", "momentum_masking": False},
        "CSER": {
            "method": "cser",
            "compressor": "topk",
            "density": density / 2,
            "reset_density": min(1.0, 4 * density),
            "reset_interval": 8,
        },
        "DEF-A (c=0.3)": {"method": "def_a", "compressor": "topk", "detach": 0.3},
        "Alg. 3 (EF + server momentum)": {"method": "ef_server_momentum", "compressor": "topk"},
        "Alg. 4 (LR inside residual)": {"method": "gmc_lr_inside", "compressor": "topk"},
        "GMC": {"method": "gmc", "compressor": "topk"},
        "GMC+ (detach=0.5)": {"method": "gmc", "compressor": "topk", "detach": 0.5},
    }


def run_one(
    spec: dict[str, Any],
    seed: int,
    args: argparse.Namespace,
    shards: list[torch.utils.data.Dataset],
    test: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    """Train one method with one seed; return per-epoch test accuracy, final RCC and wall time."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    params0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    options = dict(spec)
    method = options.pop("method")
    compressor = options.pop("compressor", None)
    density = options.pop("density", args.density)
    sim = Simulator(
        params0,
        num_workers=args.workers,
        method=method,
        compressor=compressor,
        density=density,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=seed,
        **options,
    )
    workers = [{name: t.clone() for name, t in params0.items()} for _ in range(args.workers)]
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = min(len(s) for s in shards) // args.batch_size
    curve = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        lr = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))  # cosine per epoch
        orders = [
            torch.randperm(len(s), generator=torch.Generator().manual_seed(seed * 100_003 + epoch * 101 + k))
            for k, s in enumerate(shards)
        ]
        for step in range(steps_per_epoch):
            points = [sim.gradient_points(workers[k], lr)[k] for k in range(args.workers)]
            grads = []
            for k, shard in enumerate(shards):
                idx = orders[k][step * args.batch_size : (step + 1) * args.batch_size].tolist()
                x = torch.stack([shard[i][0] for i in idx])
                y = torch.tensor([int(shard[i][1]) for i in idx])
                _load(model, points[k])
                model.zero_grad()
                loss_fn(model(x), y).backward()
                grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
            directions = sim.step(grads, points, lr)
            for k in range(args.workers):
                for name in workers[k]:
                    workers[k][name].add_(directions[k][name], alpha=-lr)
        _load(model, sim.evaluation_params(workers, lr))
        with torch.no_grad():
            accuracy = float((model(test[0]).argmax(1) == test[1]).float().mean())
        curve.append(accuracy)
    return {"curve": curve, "rcc": sim.stats.take_step()["rcc"], "seconds": time.perf_counter() - start}


def _load(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(values[name])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", nargs="*", default=None, help="subset of method labels")
    parser.add_argument("--out", type=Path, default=Path("docs/study"))
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, 3 methods")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds = 2, args.seeds[:1]
        args.methods = args.methods or ["DMSGD (dense)", "GMC", "CSER"]
    torch.set_num_threads(1)

    table = method_table(args.density)
    labels = args.methods or list(table)
    unknown = [label for label in labels if label not in table]
    if unknown:
        parser.error(f"unknown method labels {unknown}; choose from {list(table)}")
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for seed in args.seeds:
        # The partition depends on the seed too: spread over seeds includes the split's randomness.
        data = DigitsDataModule(partition="dirichlet", alpha=args.alpha, seed=seed, num_shards=args.workers)
        data.setup("fit")
        shards = [data.shard(k) for k in range(args.workers)]
        test_x = torch.stack([data.eval_full[i][0] for i in range(len(data.eval_full))])
        test_y = torch.tensor([int(data.eval_full[i][1]) for i in range(len(data.eval_full))])
        for label in labels:
            result = run_one(table[label], seed, args, shards, (test_x, test_y))
            results[label].append(result)
            print(
                f"seed {seed} {label:32s} acc {result['curve'][-1]:.4f} rcc {result['rcc']:.4f}", flush=True
            )

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/noniid_study.py " + " ".join(sys.argv[1:])
    write_markdown(args, results, command)
    (args.out / "results.json").write_text(
        json.dumps({"args": _jsonable(vars(args)), "results": results}, indent=1)
    )
    plot(results, args.out / "curves.png", args)


def write_markdown(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], command: str) -> None:
    lines = [
        "# Non-IID study on digits",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"K = {args.workers} simulated workers, Dirichlet alpha = {args.alpha} (Lin et al. split), "
        f"DigitsCNN, {args.epochs} epochs, batch {args.batch_size} per worker, SGD lr {args.lr} "
        f"(cosine per epoch), momentum {args.momentum}, weight decay {args.weight_decay}, top-k density "
        f"{args.density} for every compressed method (CSER: rho1 = density/2, rho2 = 4 density, H = 8), "
        f"seeds {args.seeds}. Final test accuracy on the 357 held-out digits, evaluated on each "
        "method's evaluation model (CSER: the average of the workers' models; DEF-A: x - mean error).",
        "",
        "| method | test accuracy (mean ± std) | min | max | RCC (mean) |",
        "|---|---|---|---|---|",
    ]
    for label, runs in results.items():
        finals = np.array([r["curve"][-1] for r in runs]) * 100
        rccs = np.array([r["rcc"] for r in runs])
        spread = finals.std(ddof=1) if len(finals) > 1 else 0.0
        lines.append(
            f"| {label} | {finals.mean():.2f}% ± {spread:.2f} | {finals.min():.2f}% | {finals.max():.2f}% | "
            f"{rccs.mean() * 100:.2f}% |"
        )
    lines += ["", "![test accuracy per epoch](curves.png)", ""]
    (args.out / "results.md").write_text("\n".join(lines))


def plot(results: dict[str, list[dict[str, Any]]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, runs in results.items():
        curves = np.array([r["curve"] for r in runs]) * 100
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(0)
        ax.plot(epochs, mean, label=label)
        if len(runs) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits, K={args.workers}, Dirichlet {args.alpha}: mean over seeds (band: min-max)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


if __name__ == "__main__":
    main()
