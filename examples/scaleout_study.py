"""topk_shared against exact top-k (and wire_dtype="bf16") in the digits study, at K = 8 and K = 32.

The same data, model, schedule, seeds and simulator loop as ``examples/noniid_study.py`` (imported
from it: ``SeedPlan`` and ``run_one``), Dirichlet(0.1) non-IID split, density 1 %; only the arms
differ. Writes ``docs/scaleout_study.md`` (mean, spread and per-seed final accuracy, paired
difference from GMC with exact top-k) and ``docs/scaleout_study.json``::

    python examples/scaleout_study.py --workers 8 32 --seeds 0 1 2 3 4
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

from examples.noniid_study import SeedPlan, run_one  # noqa: E402

REFERENCE = "GMC (topk)"
ARMS: dict[str, dict[str, Any]] = {
    "DMSGD (dense)": {"method": "dmsgd"},
    REFERENCE: {"method": "gmc", "compressor": "topk"},
    "GMC (topk_shared)": {"method": "gmc", "compressor": "topk_shared"},
    "GMC (topk_shared, bf16 wire)": {"method": "gmc", "compressor": "topk_shared", "wire_dtype": "bf16"},
    # topk_shared aggregates k coordinates, exact top-k up to K k (the union): about 2.7x the RCC at
    # equal density here, so one arm spends that budget on a 3x density
    "GMC (topk_shared, 3x density)": {"method": "gmc", "compressor": "topk_shared", "density_factor": 3.0},
    "GMC+ (topk, detach=0.5)": {"method": "gmc", "compressor": "topk", "detach": 0.5},
    "GMC+ (topk_shared, detach=0.5)": {"method": "gmc", "compressor": "topk_shared", "detach": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for workers in args.workers:
        run_args = argparse.Namespace(**{**vars(args), "workers": workers})
        results[workers] = {label: [] for label in ARMS}
        for seed in args.seeds:
            plan = SeedPlan(seed)
            shards, test = plan.shards(workers, args.alpha)
            for label, arm in ARMS.items():
                spec = dict(arm)
                factor = spec.pop("density_factor", None)
                if factor is not None:
                    spec["density"] = factor * args.density
                start = time.perf_counter()
                result = run_one(spec, plan, run_args, shards, test)
                results[workers][label].append(result)
                print(
                    f"K={workers} seed {seed} {label:34s} acc {result['curve'][-1]:.4f} "
                    f"rcc {result['rcc']:.4f} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    command = "python examples/scaleout_study.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout_study.json").write_text(
        json.dumps({"command": command, "results": {str(k): v for k, v in results.items()}}, indent=1)
    )
    lines = [
        "# topk_shared vs exact top-k: digits, Dirichlet(0.1), density 1 %",
        "",
        f"Command: `{command}` (simulator, {args.epochs} epochs, lr {args.lr}, cosine, batch "
        f"{args.batch_size} per worker). Final test accuracy over seeds {args.seeds}; paired: the "
        f"mean over seeds of (arm - {REFERENCE}) with its smallest and largest per-seed difference.",
        "",
    ]
    for workers, by_arm in results.items():
        lines += [f"## K = {workers}", "", "| arm | mean acc | std | per seed | paired vs GMC (topk) | RCC |"]
        lines += ["|---|---:|---:|---|---|---:|"]
        reference = [r["curve"][-1] for r in by_arm[REFERENCE]]
        for label, runs in by_arm.items():
            accs = [r["curve"][-1] for r in runs]
            diffs = [a - b for a, b in zip(accs, reference, strict=True)]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            paired = f"{statistics.mean(diffs):+.4f} [{min(diffs):+.4f}, {max(diffs):+.4f}]"
            lines.append(
                f"| {label} | {statistics.mean(accs):.4f} | {spread:.4f} | "
                f"{' '.join(f'{a:.3f}' for a in accs)} | {paired} | {runs[0]['rcc']:.4f} |"
            )
        lines.append("")
    (args.out / "scaleout_study.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
