"""topk_shared against exact top-k at equal cost, and 16-bit values against fp32, in the simulator.

The simulator loop of ``examples/noniid_study.py`` (imported from ``examples/noniid_runs.py``:
``SeedPlan``, ``run_one``), Dirichlet(``--alpha``) non-IID split, one learning rate and schedule for
every arm. Four suites:

* ``equal_cost`` (a generated set, K = 32): exact top-k at ``--density`` against
  ``topk_shared`` at the same density **and** at the density that costs the same RCC, exact top-k at
  the density that costs what ``topk_shared`` costs, and GMC+ with RBGS at top-k's RCC. RCC (the GMC
  paper's eq. (9), ``docs/algorithms.md`` 3.8) is measured in every run and printed beside its
  accuracy, so "equal RCC" is visible, not assumed. The synthetic set (a Gaussian mixture,
  ``--train-size`` samples, ``examples/data/synthetic.py``) gives each of 32 workers hundreds of
  samples, where digits would leave about 45.
* ``equal_cost_digits``: the same arms on scikit-learn's digits with K = 8 (180 samples per worker;
  at K = 32 digits would leave 45; the same arms without the GMC+ one).
* ``starved_digits``: the same arms on digits with K = 32, 45 samples per worker (most workers see
  one or two classes): where the data per worker, not the compressor, is the limit.
* ``wire`` (digits, K = 8): ``wire_dtype="bf16"`` against fp32 on the
  routes that sum 16-bit values (RBGS, ``topk_shared``) and on top-k's all-gather (no sum to round).

Writes ``--out``/``scaleout_study.md`` (mean, spread and per-seed final test accuracy, paired
difference from each suite's reference, RCC) and ``scaleout_study.json`` with the command::

    python examples/scaleout_study.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.noniid_runs import Problem, SeedPlan, run_one  # noqa: E402

#: the reference of a 16-bit arm is the same arm in fp32
FP32_TWIN = "the same arm in fp32"
#: the arms that compare topk_shared with exact top-k at equal density and at equal RCC (its aggregate
#: has one rank's support, so 3x the density costs what top-k's 1x does)
TOPK_SHARED_AT_EQUAL_COST: dict[str, dict[str, Any]] = {
    "DMSGD (dense)": {"method": "dmsgd"},
    "GMC, topk 1x": {"method": "gmc", "compressor": "topk"},
    "GMC, topk_shared 1x (equal density)": {"method": "gmc", "compressor": "topk_shared"},
    "GMC, topk_shared 3x (equal RCC)": {"method": "gmc", "compressor": "topk_shared", "density_factor": 3.0},
    "GMC, topk 0.35x (RCC of topk_shared 1x)": {
        "method": "gmc",
        "compressor": "topk",
        "density_factor": 0.35,
    },
}
#: per suite: (data set, K, epochs, reference arm, arms). An arm's ``density_factor`` multiplies
#: ``--density``.
SUITES: dict[str, tuple[str, int, int, str, dict[str, dict[str, Any]]]] = {
    "equal_cost": (
        "synthetic",
        32,
        10,
        "GMC, topk 1x",
        {
            **TOPK_SHARED_AT_EQUAL_COST,
            "GMC+, rbgs 3x, detach 0.5 (equal RCC)": {
                "method": "gmc",
                "compressor": "rbgs",
                "detach": 0.5,
                "density_factor": 3.0,
            },
        },
    ),
    "equal_cost_digits": (
        "digits",
        8,
        30,
        "GMC, topk 1x",
        TOPK_SHARED_AT_EQUAL_COST,
    ),
    "starved_digits": (
        "digits",
        32,
        30,
        "GMC, topk 1x",
        TOPK_SHARED_AT_EQUAL_COST,
    ),
    "wire": (
        "digits",
        8,
        30,
        FP32_TWIN,
        {
            "GMC+, rbgs, fp32": {"method": "gmc", "compressor": "rbgs", "detach": 0.5},
            "GMC+, rbgs, bf16": {"method": "gmc", "compressor": "rbgs", "detach": 0.5, "wire_dtype": "bf16"},
            "GMC, topk_shared, fp32": {"method": "gmc", "compressor": "topk_shared"},
            "GMC, topk_shared, bf16": {"method": "gmc", "compressor": "topk_shared", "wire_dtype": "bf16"},
            "GMC, topk, fp32": {"method": "gmc", "compressor": "topk"},
            "GMC, topk, bf16": {"method": "gmc", "compressor": "topk", "wire_dtype": "bf16"},
        },
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=None, help="default: the suite's (10, 30)")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--train-size", type=int, default=9600, help="synthetic samples (300 per worker at K=32)"
    )
    parser.add_argument("--arms", nargs="*", default=None, help="subset of arm labels")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for suite in args.suite:
        data, workers, epochs, _, arms = SUITES[suite]
        problem = Problem(data=data, train_size=args.train_size)
        run_args = argparse.Namespace(**{**vars(args), "workers": workers, "epochs": args.epochs or epochs})
        chosen = {label: arm for label, arm in arms.items() if args.arms is None or label in args.arms}
        results[suite] = {label: [] for label in chosen}
        for seed in args.seeds:
            plan = SeedPlan(seed, problem)
            shards, test = plan.shards(workers, args.alpha)
            for label, arm in chosen.items():
                spec = dict(arm)
                spec["density"] = spec.pop("density_factor", 1.0) * args.density
                start = time.perf_counter()
                result = run_one(spec, plan, run_args, shards, test)
                result["density"] = spec["density"]
                results[suite][label].append(result)
                print(
                    f"{suite} K={workers} seed {seed} {label:42s} acc {result['curve'][-1]:.4f} "
                    f"rcc {result['rcc']:.4f} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    command = "python examples/scaleout_study.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout_study.json").write_text(
        json.dumps(
            {"command": command, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        )
    )
    lines = write_markdown(results, args, command)
    (args.out / "scaleout_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_markdown(
    results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace, command: str
) -> list[str]:
    lines = [
        "# topk_shared against exact top-k at equal cost; 16-bit values against fp32",
        "",
        f"Command: `{command}` (simulator, SGD lr {args.lr} cosine per epoch, momentum "
        f"{args.momentum}, weight decay {args.weight_decay}, batch {args.batch_size} per worker, "
        f"Dirichlet({args.alpha}) split, seeds {args.seeds}). Final test accuracy; paired: the mean over "
        f"seeds of (arm - reference) with the smallest and largest per-seed difference. Densities are "
        f"multiples of {args.density:g}; RCC is measured (GMC paper eq. (9)).",
        "",
    ]
    for suite, by_arm in results.items():
        data, workers, epochs, reference_label, _ = SUITES[suite]
        size = args.train_size if data == "synthetic" else 1440
        what = (
            "Gaussian mixture, 64 features, 10 classes, MLP 64-128-10" if data == "synthetic" else "DigitsCNN"
        )
        lines += [
            f"## {suite}: {data} ({what}), K = {workers}, {size // workers} samples per worker, "
            f"{args.epochs or epochs} epochs",
            "",
        ]
        lines += [f"| arm | density | RCC | mean acc | std | per seed | paired vs {reference_label} |"]
        lines += ["|---|---:|---:|---:|---:|---|---|"]
        for label, runs in by_arm.items():
            twin = label.replace("bf16", "fp32") if reference_label == FP32_TWIN else reference_label
            reference = [r["curve"][-1] for r in by_arm.get(twin, [])]
            accs = [r["curve"][-1] for r in runs]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            paired = ""
            if reference:
                diffs = [a - b for a, b in zip(accs, reference, strict=True)]
                paired = f"{statistics.mean(diffs):+.4f} [{min(diffs):+.4f}, {max(diffs):+.4f}]"
            density = "1" if runs[0].get("density") is None or "dense" in label else f"{runs[0]['density']:g}"
            per_seed = " ".join(f"{a:.3f}" for a in accs)
            rcc = statistics.mean(r["rcc"] for r in runs)
            lines.append(
                f"| {label} | {density} | {rcc:.4f} | {statistics.mean(accs):.4f} | {spread:.4f} | "
                f"{per_seed} | {paired} |"
            )
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
