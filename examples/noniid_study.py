"""Non-IID study on scikit-learn's digits: K simulated workers, Dirichlet(alpha) split, many methods.

Runs methods of ``lightning_gmc`` on the same data, model, schedule and seeds with
:class:`lightning_gmc.Simulator` (K virtual workers in one process, the same method and compressor code
as the DDP hook), at matched communication within each suite, and reports the measured RCC of every
run next to its accuracy. Nothing here is tuned per method: one learning rate, one schedule, one
density for all.

Suites (``--suite``, several allowed; ``all`` is every suite):

* ``topk``: every method with top-k at ``--density`` (CSER splits it between its two compressors
  following Xie et al.'s pattern ``rho2 / H = rho1``).
* ``adamw``: error feedback on the gradient (``method="ef"``) with top-k at ``--density`` under AdamW,
  next to dense AdamW (``ef`` with the identity compressor is exactly data-parallel AdamW), the same
  error feedback under the SGD of the other arms, and GMC with SGD for reference. AdamW's learning
  rate and decay are ``--adamw-lr`` / ``--adamw-weight-decay`` (library-default-like values, not
  tuned); the optimizer steps on the simulator's aggregated gradient (:func:`run_one_with_optimizer`).
* ``rbgs``: the GMC paper's Tables 3-4 comparison under RBGS at ``--density`` (equal RCC): GMC+ for
  lambda in {0 (= GMC), 0.3, 0.5, 1.0}, DEF-A for c in {0, 0.3, 0.5}, and "GMC+ with momentum on the
  aggregate" (``ef_server_momentum`` with ``detach``) for lambda in {0 (= Algorithm 3), 0.3, 0.5, 1.0}.

Every suite also runs the dense baseline (DMSGD). The seed moves everything random, for every arm:
the Dirichlet partition, the model initialisation, each worker's batch order and the compressors'
random streams (RBGS blocks). For one seed every arm starts from the same model and sees the same
batches, so arms are compared pairwise. The 357 test digits are fixed (``DigitsDataModule``'s
``split_seed``) so accuracies are comparable across seeds; ``results.json`` records per-seed
fingerprints of the initialisation, partition and batch order.

Writes to ``--out`` (default ``docs/study``): ``results.md`` (mean and spread over seeds of the final
test accuracy and test loss, per-seed accuracies, the paired difference from each suite's reference
arm, and RCC, with the command that produced it), ``results.json`` (every curve) and
``curves_<suite>.png`` (test accuracy per epoch, mean over seeds).

    python examples/noniid_study.py --suite all --density 0.01 --seeds 0 1 2 3 4   # the committed results
    python examples/noniid_study.py --quick      # smoke run (2 epochs, 1 seed, 3 arms per suite)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.data import DigitsDataModule  # noqa: E402
from examples.models import DigitsCNN  # noqa: E402
from lightning_gmc import Simulator  # noqa: E402

SUITES = ("topk", "rbgs", "adamw")
DENSE = "DMSGD (dense)"
# The arm each suite's paired column compares with: the paper's method (top-k) and the baseline the
# paper's Tables 3-4 compare GMC+ with (RBGS).
REFERENCE = {"topk": "GMC", "rbgs": "DEF-A (RBGS, c=0.3)", "adamw": "AdamW (dense)"}
QUICK_ARMS = {
    "topk": [DENSE, "GMC", "CSER"],
    "rbgs": ["GMC+ (RBGS, lambda=0.5)", "DEF-A (RBGS, c=0.3)", "GMC+ agg. momentum (RBGS, lambda=0.5)"],
    "adamw": ["AdamW (dense)", "EF + AdamW (top-k)"],
}


def suite_arms(suite: str, density: float) -> dict[str, dict[str, Any]]:
    """The arms of one suite: label -> method, compressor and options (density: ``--density``)."""
    dense = {DENSE: {"method": "dmsgd"}}
    if suite == "topk":
        return {
            **dense,
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
    if suite == "rbgs":
        arms = dict(dense)
        for lam in (0.0, 0.3, 0.5, 1.0):
            label = "GMC (RBGS, no detach)" if lam == 0 else f"GMC+ (RBGS, lambda={lam:g})"
            arms[label] = {"method": "gmc", "compressor": "rbgs", "detach": lam}
        for c in (0.0, 0.3, 0.5):
            arms[f"DEF-A (RBGS, c={c:g})"] = {"method": "def_a", "compressor": "rbgs", "detach": c}
        for lam in (0.0, 0.3, 0.5, 1.0):
            label = "Alg. 3 (RBGS, no detach)" if lam == 0 else f"GMC+ agg. momentum (RBGS, lambda={lam:g})"
            arms[label] = {"method": "ef_server_momentum", "compressor": "rbgs", "detach": lam}
        return arms
    if suite == "adamw":
        return adamw_arms()
    raise ValueError(f"unknown suite {suite!r}; choose from {[*SUITES, 'all']}")


def adamw_arms() -> dict[str, dict[str, Any]]:
    """The ``adamw`` suite: ``ef`` under AdamW (dense and top-k), and GMC with SGD for reference.

    Arms with an ``"optimizer"`` key run through :func:`run_one_with_optimizer`.
    """
    return {
        DENSE: {"method": "dmsgd"},
        "AdamW (dense)": {"method": "ef", "compressor": "none", "optimizer": "adamw"},
        "EF + AdamW (top-k)": {"method": "ef", "compressor": "topk", "optimizer": "adamw"},
        "EF21 + AdamW (top-k)": {"method": "ef21", "compressor": "topk", "optimizer": "adamw"},
        # The same error feedback under the other arms' SGD: separates the optimizer from the method.
        "EF + SGD momentum (top-k)": {"method": "ef", "compressor": "topk", "optimizer": "sgd"},
        "GMC": {"method": "gmc", "compressor": "topk"},
    }


@dataclass(frozen=True)
class SeedPlan:
    """Everything random in one seed's runs, derived from ``seed`` alone."""

    seed: int

    def init_params(self) -> dict[str, Tensor]:
        """The DigitsCNN initialisation of this seed (the same for every arm)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = DigitsCNN()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def shards(self, workers: int, alpha: float) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
        """Per-worker training tensors of this seed's Dirichlet partition, and the (fixed) test set."""
        data = DigitsDataModule(partition="dirichlet", alpha=alpha, seed=self.seed, num_shards=workers)
        data.setup("fit")
        shards = [_stack(data.shard(k)) for k in range(workers)]
        assert data.eval_full is not None
        return shards, _stack(data.eval_full)

    def batch_order(self, epoch: int, worker: int, size: int) -> Tensor:
        """Worker ``worker``'s sample order in ``epoch``."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch * 101 + worker)
        return torch.randperm(size, generator=gen)

    def fingerprint(self, shards: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
        """What this seed fixed: a checksum of the initial model, each worker's class counts and the
        first batch worker 0 draws (recorded so that seed-independence is visible, not assumed)."""
        init = self.init_params()
        return {
            "init_checksum": float(sum(float(p.double().abs().sum()) for p in init.values())),
            "class_counts": [torch.bincount(y, minlength=10).tolist() for _, y in shards],
            "first_batch_worker0": self.batch_order(0, 0, len(shards[0][1]))[:8].tolist(),
        }


def _stack(dataset: Any) -> tuple[Tensor, Tensor]:
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ys = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return xs, ys


def run_one(
    spec: dict[str, Any],
    plan: SeedPlan,
    args: argparse.Namespace,
    shards: list[tuple[Tensor, Tensor]],
    test: tuple[Tensor, Tensor],
) -> dict[str, Any]:
    """Train one arm with one seed; return per-epoch test accuracy and loss, final RCC and wall time."""
    params0 = plan.init_params()
    model = DigitsCNN()
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
        seed=plan.seed,  # the compressors' random streams
        **options,
    )
    workers = [{name: t.clone() for name, t in params0.items()} for _ in range(args.workers)]
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = min(len(y) for _, y in shards) // args.batch_size
    curve: list[float] = []
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        lr = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))  # cosine per epoch
        orders = [plan.batch_order(epoch, k, len(y)) for k, (_, y) in enumerate(shards)]
        for step in range(steps_per_epoch):
            points = sim.gradient_points(workers[0], lr)
            if sim.method.evaluation_point == "mean_params":  # per-worker models (CSER)
                points = [sim.gradient_points(workers[k], lr)[k] for k in range(args.workers)]
            grads = []
            for k, (x_all, y_all) in enumerate(shards):
                idx = orders[k][step * args.batch_size : (step + 1) * args.batch_size]
                _load(model, points[k])
                model.zero_grad()
                loss_fn(model(x_all[idx]), y_all[idx]).backward()
                grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
            directions = sim.step(grads, points, lr)
            for k in range(args.workers):
                for name in workers[k]:
                    workers[k][name].add_(directions[k][name], alpha=-lr)
        _load(model, sim.evaluation_params(workers, lr))
        with torch.no_grad():
            logits = model(test[0])
            curve.append(float((logits.argmax(1) == test[1]).float().mean()))
            losses.append(float(loss_fn(logits, test[1])))
    return {
        "curve": curve,
        "test_loss": losses,
        "rcc": sim.stats.take_step()["rcc"],
        "seconds": time.perf_counter() - start,
    }


def run_one_with_optimizer(
    spec: dict[str, Any],
    plan: SeedPlan,
    args: argparse.Namespace,
    shards: list[tuple[Tensor, Tensor]],
    test: tuple[Tensor, Tensor],
) -> dict[str, Any]:
    """:func:`run_one` for a method that leaves the optimizer in charge (``ef``): the simulator
    returns the aggregated gradient and ``torch.optim.AdamW`` (``"optimizer": "adamw"``) or
    ``torch.optim.SGD`` with the other arms' momentum and weight decay (``"sgd"``) steps on it, cosine
    per epoch, with the same data, batches, initialisation and evaluation as every other arm of the
    seed."""
    options = dict(spec)
    optimizer_name = options.pop("optimizer")
    if optimizer_name not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer_name!r}")
    method = options.pop("method")
    compressor = options.pop("compressor", None)
    density = options.pop("density", args.density)
    params0 = plan.init_params()
    sim = Simulator(
        params0, num_workers=args.workers, method=method, compressor=compressor, density=density,
        seed=plan.seed, **options,
    )  # fmt: skip
    model = DigitsCNN()
    _load(model, params0)
    base_lr = args.adamw_lr if optimizer_name == "adamw" else args.lr
    optimizer: torch.optim.Optimizer
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=args.adamw_weight_decay)
    else:  # the other arms' SGD, applied by torch instead of inside the method
        optimizer = torch.optim.SGD(
            model.parameters(), lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = min(len(y) for _, y in shards) // args.batch_size
    curve: list[float] = []
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        lr = 0.5 * base_lr * (1 + math.cos(math.pi * epoch / args.epochs))  # cosine per epoch
        for group in optimizer.param_groups:
            group["lr"] = lr
        orders = [plan.batch_order(epoch, k, len(y)) for k, (_, y) in enumerate(shards)]
        for step in range(steps_per_epoch):
            weights = {name: p.detach().clone() for name, p in model.named_parameters()}
            points = sim.gradient_points(weights, lr)
            grads = []
            for k, (x_all, y_all) in enumerate(shards):
                idx = orders[k][step * args.batch_size : (step + 1) * args.batch_size]
                model.zero_grad()
                loss_fn(model(x_all[idx]), y_all[idx]).backward()
                grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
            gradient = sim.step(grads, points, lr)[0]
            for name, p in model.named_parameters():
                p.grad = gradient[name]
            optimizer.step()
        with torch.no_grad():
            logits = model(test[0])
            curve.append(float((logits.argmax(1) == test[1]).float().mean()))
            losses.append(float(loss_fn(logits, test[1])))
    return {
        "curve": curve,
        "test_loss": losses,
        "rcc": sim.stats.take_step()["rcc"],
        "seconds": time.perf_counter() - start,
    }


def _load(model: nn.Module, values: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(values[name])


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--suite", nargs="+", default=["all"], choices=[*SUITES, "all"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--adamw-lr", type=float, default=2e-3, help="AdamW arms (suite adamw)")
    parser.add_argument("--adamw-weight-decay", type=float, default=0.01, help="AdamW arms (suite adamw)")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of arm labels")
    parser.add_argument("--out", type=Path, default=Path("docs/study"))
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, 3 arms per suite")
    args = parser.parse_args()
    suites = list(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    tables = {suite: suite_arms(suite, args.density) for suite in suites}
    if args.quick:
        args.epochs, args.seeds = 2, args.seeds[:1]
        args.methods = args.methods or [label for s in suites for label in QUICK_ARMS[s]]
    known = {label: spec for table in tables.values() for label, spec in table.items()}
    unknown = [label for label in args.methods or [] if label not in known]
    if unknown:
        parser.error(f"unknown arm labels {unknown}; choose from {list(known)}")
    labels = [label for label in known if args.methods is None or label in args.methods]
    torch.set_num_threads(1)

    results: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    fingerprints = {}
    total, done, started = len(labels) * len(args.seeds), 0, time.perf_counter()
    for seed in args.seeds:
        plan = SeedPlan(seed)
        shards, test = plan.shards(args.workers, args.alpha)
        fingerprints[seed] = plan.fingerprint(shards)
        for label in labels:
            run = run_one_with_optimizer if "optimizer" in known[label] else run_one
            result = run(known[label], plan, args, shards, test)
            results[label].append(result)
            done += 1
            eta = (time.perf_counter() - started) / done * (total - done)
            print(
                f"seed {seed} {label:40s} acc {result['curve'][-1]:.4f} loss {result['test_loss'][-1]:.4f} "
                f"rcc {result['rcc']:.4f} ({result['seconds']:.0f} s; {done}/{total}, "
                f"~{eta / 60:.0f} min left)",
                flush=True,
            )

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/noniid_study.py " + " ".join(sys.argv[1:])
    groups = {suite: [label for label in table if label in results] for suite, table in tables.items()}
    write_markdown(args, results, groups, fingerprints, command)
    (args.out / "results.json").write_text(
        json.dumps(
            {"command": command, "args": _jsonable(vars(args)), "seeds": fingerprints, "results": results},
            indent=1,
        )
    )
    for suite, group in groups.items():
        if group:
            curves = {label: results[label] for label in group}
            plot(curves, known, args.out / f"curves_{suite}.png", args, suite)


def _stats(values: list[float]) -> tuple[float, float]:
    array = np.array(values)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


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


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


if __name__ == "__main__":
    main()
