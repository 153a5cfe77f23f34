"""Offline demo: digits, non-IID, 2 CPU processes (gloo), GMCStrategy versus plain DDP.

    python -m pip install -e ".[examples]" && python examples/demo.py

Trains the small digits CNN on scikit-learn's bundled 8x8 digits (no download), split across 2 ranks by
the non-IID Dirichlet(0.1) procedure of Lin et al., once with ``GMCStrategy`` (approximate top-k at 1 %
density, error feedback, global momentum: the setting the README recommends) and once with Lightning's
plain ``DDPStrategy`` (dense all-reduce).
Both use ``SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)`` with a per-epoch cosine schedule. It then
prints test accuracy, bytes sent per rank, RCC and wall time for each.

* *bytes sent*: bytes one rank puts on the wire for gradient communication over the whole run. GMC
  reports its own count (``gmc/bytes_sent_total``); for DDP it is the ring all-reduce of every fp32
  gradient, ``2 (K-1)/K * 4 d`` bytes per step, the same model GMC uses for its ``dense_bytes``.
* *RCC*: the paper's relative communication cost (parameter-server accounting, its eq. (9);
  ``docs/algorithms.md`` section 3.8); 1 for DDP
  by definition.
* *wall time*: training and per-epoch validation on rank 0, from ``on_train_start`` to ``on_train_end``
  (without starting the processes and joining the process group).

Each run executes in its own child process (``--worker``), which Lightning's launcher turns into the 2
ranks, so the runs cannot affect each other. ``--quick`` trains 1 epoch on a few batches (for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

RUNS: dict[str, str] = {
    "gmc": "GMCStrategy (GMC, approximate top-k 1%)",
    "gmc_plus": "GMCStrategy (GMC+, RBGS 1%, detach 0.5)",
    "ddp": "DDPStrategy (dense all-reduce)",
}
WORLD_SIZE = 2


def _strategy(run: str) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_gmc import GMCStrategy

    if run == "gmc":
        return GMCStrategy(
            method="gmc", compressor="topk_approx", density=0.01, detach=0.0, process_group_backend="gloo"
        )
    if run == "gmc_plus":
        return GMCStrategy(
            method="gmc", compressor="rbgs", density=0.01, detach=0.5, process_group_backend="gloo"
        )
    if run == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    raise ValueError(f"unknown run {run!r}; expected one of {sorted(RUNS)}")


class _FitTimer(Callback):
    """Wall time from the first to the last training hook: excludes launching ranks and joining the group."""

    def __init__(self) -> None:
        self.start = 0.0
        self.elapsed = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.elapsed = time.perf_counter() - self.start


def worker(run: str, epochs: int, quick: bool, result_path: Path, progress: bool) -> None:
    """One training run on ``WORLD_SIZE`` CPU ranks; rank 0 writes the result JSON."""
    import logging

    from lightning.pytorch import Trainer, seed_everything

    from examples.data import DigitsDataModule
    from examples.models import ClassificationModule, DigitsCNN, count_parameters

    logging.getLogger("examples").setLevel(logging.INFO)
    seed_everything(0, workers=True)
    dm = DigitsDataModule(partition="dirichlet", alpha=0.1, seed=0, batch_size=16)
    net = DigitsCNN()
    module = ClassificationModule(net, lr=0.1, momentum=0.9, weight_decay=1e-4, max_epochs=epochs)
    timer = _FitTimer()
    limits: dict[str, Any] = {"limit_train_batches": 5, "limit_val_batches": 1} if quick else {}
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        num_nodes=1,
        strategy=_strategy(run),
        max_epochs=epochs,
        use_distributed_sampler=False,  # DigitsDataModule partitions the data per rank itself
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=[timer],
        **limits,
    )
    trainer.fit(module, datamodule=dm)
    wall = timer.elapsed
    # Read the fit metrics now: trainer.test() replaces callback_metrics with the test ones.
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    steps = trainer.global_step
    d = count_parameters(net)
    if run == "ddp":
        bytes_sent = steps * 2.0 * (WORLD_SIZE - 1) / WORLD_SIZE * 4 * d
        rcc = 1.0
    else:
        bytes_sent = metrics["gmc/bytes_sent_total"]
        rcc = metrics["gmc/rcc"]
    if trainer.global_rank == 0:
        result_path.write_text(
            json.dumps(
                {
                    "run": run,
                    "label": RUNS[run],
                    "test_acc": float(test["test/acc"]),
                    "bytes_sent": bytes_sent,
                    "dense_bytes": steps * 2.0 * (WORLD_SIZE - 1) / WORLD_SIZE * 4 * d,
                    "rcc": rcc,
                    "wall_s": wall,
                    "steps": steps,
                    "params": d,
                }
            )
        )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


def format_table(results: list[dict[str, Any]]) -> str:
    """The summary table (markdown, so it can be pasted into docs as is)."""
    lines = [
        "| run | test acc | bytes sent / rank | RCC | wall time |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {100 * r['test_acc']:.2f}% | {_fmt_bytes(r['bytes_sent'])} | "
            f"{r['rcc']:.4f} | {r['wall_s']:.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every requested configuration in its own process group and print the table."""
    parser = argparse.ArgumentParser(description="digits non-IID on 2 gloo processes: GMC vs plain DDP")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--runs", nargs="+", default=["gmc", "ddp"], choices=sorted(RUNS))
    parser.add_argument("--quick", action="store_true", help="1 epoch of 5 batches per run (smoke test)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs

    if args.worker is not None:
        assert args.result is not None
        worker(args.worker, epochs, args.quick, args.result, progress=not args.no_progress)
        # Lightning leaves the gloo group up after fit/test; its threads still running as the
        # interpreter exits can abort the process ("terminate called without an active exception").
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return 0

    results: list[dict[str, Any]] = []
    # Children must start clean: a rank variable inherited from an enclosing launcher would make
    # Lightning believe the processes were already created.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")
    }
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            setting = f"digits, non-IID Dirichlet(0.1), {WORLD_SIZE} CPU processes, {epochs} epochs"
            print(f"\n=== {RUNS[run]}: {setting} ===")
            sys.stdout.flush()
            result = Path(tmp) / f"{run}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run, "--result", str(result)]
            cmd += ["--epochs", str(epochs)] + (["--quick"] if args.quick else [])
            cmd += ["--no-progress"] if args.no_progress else []
            proc = subprocess.run(cmd, env=env, cwd=str(_ROOT), check=False)
            if proc.returncode != 0 or not result.exists():
                print(f"run {run!r} failed (exit code {proc.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(result.read_text()))

    print()
    print(format_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
