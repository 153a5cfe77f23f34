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
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.noniid_arms import DENSE, QUICK_ARMS, REFERENCE, SUITES, adamw_arms, suite_arms  # noqa: E402
from examples.noniid_report import plot, write_markdown  # noqa: E402
from examples.noniid_runs import SeedPlan, run_one, run_one_with_optimizer  # noqa: E402

# The study's pieces, importable from the script as well as from their modules.
__all__ = [
    "DENSE",
    "QUICK_ARMS",
    "REFERENCE",
    "SUITES",
    "SeedPlan",
    "adamw_arms",
    "main",
    "plot",
    "run_one",
    "run_one_with_optimizer",
    "suite_arms",
    "write_markdown",
]


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
    parser.add_argument(
        "--report-from",
        type=Path,
        default=None,
        help="rewrite results.md from this results.json (no training)",
    )
    args = parser.parse_args()
    if args.report_from is not None:
        rewrite_report(args.report_from, vars(parser.parse_args([])))
        return
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


def rewrite_report(path: Path, defaults: dict[str, Any]) -> None:
    """``results.md`` again from a finished run's ``results.json`` (its command, arguments, seeds and
    results), next to it: the report's text may change, its numbers stay those of the run. Arguments
    the run did not record take ``defaults``."""
    saved = json.loads(path.read_text())
    args = argparse.Namespace(**{**defaults, **saved["args"], "out": path.parent})
    suites = list(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    tables = {suite: suite_arms(suite, args.density) for suite in suites}
    results = saved["results"]
    # a suite the run had: every one of its arms has results (suites share the dense and GMC arms)
    groups = {
        suite: list(table) for suite, table in tables.items() if all(label in results for label in table)
    }
    write_markdown(args, results, groups, saved["seeds"], saved["command"])


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


if __name__ == "__main__":
    main()
