"""One host of ``bench_plan_link.py``, run inside its network namespace (not meant to be run by hand).

Workloads (each host writes ``<out>.rank<N>.json``):

* ``calibrate``: both hosts at once (so they contend for the CPUs as they do in a run), one thread
  each: the planner's device profile (``lightning_gmc.plan.calibrate``, without the loopback latency)
  and the compute time of one step of the benchmark's MLP without communication: a single-device
  ``Trainer`` step (what every arm's step holds besides its hook and its collectives: the loop,
  forward, backward, ``SGD(momentum)``; the difference of two run lengths), and for reference the bare
  forward, backward and optimizer step;
* ``probe``: the link between the hosts as the planner sees it: the median time of a 4-byte gloo
  all-reduce (the per-collective latency) and of an all-reduce of ``--probe-bytes`` (the rate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from link_node import MLPModule, StepClock, make_mlp  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gmc.plan.calibrate import calibrate  # noqa: E402
from lightning_gmc.plan.models import measure_compute  # noqa: E402
from lightning_gmc.transport import ring_allreduce_bytes  # noqa: E402


def trainer_fit_seconds(args: argparse.Namespace, steps: int) -> float:
    """Seconds of a single-device fit of ``steps`` steps of the benchmark's module (no communication)."""
    seed_everything(0)
    samples = steps * args.batch
    x, y = torch.randn(samples, args.dims[0]), torch.randint(0, args.dims[-1], (samples,))
    clock = StepClock()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLPModule(args.dims), DataLoader(TensorDataset(x, y), batch_size=args.batch))
    return clock.end - clock.start


def run_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    profile = calibrate(min_run_time=args.min_run_time, latency=False)
    example = torch.randn(args.batch, args.dims[0])
    # the loss of the benchmark's module is a cross-entropy; the outputs' sum costs the same backward
    bare = [measure_compute(lambda: make_mlp(args.dims), example, steps=7) for _ in range(3)]
    short, long = (10, 60)
    fits = [(trainer_fit_seconds(args, short), trainer_fit_seconds(args, long)) for _ in range(3)]
    trainer_step = statistics.median((b - a) / (long - short) for a, b in fits)
    return {"profile": asdict(profile), "compute_s": trainer_step, "bare_compute_s": statistics.median(bare)}


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    dist.init_process_group("gloo", rank=int(os.environ["NODE_RANK"]), world_size=2)
    small, big = torch.zeros(1), torch.zeros(args.probe_bytes // 4)

    def timed(tensor: torch.Tensor) -> float:
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        return time.perf_counter() - start

    latency = statistics.median(timed(small) for _ in range(30))
    big_s = statistics.median(timed(big) for _ in range(args.probe_repeats))
    dist.destroy_process_group()
    wire = ring_allreduce_bytes(args.probe_bytes, 2)
    return {"latency_s": latency, "probe_s": big_s, "link_bps": 8 * wire / max(big_s - latency, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload", choices=["calibrate", "probe"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 1024, 960, 10])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--probe-bytes", type=int, default=4 << 20)
    parser.add_argument("--probe-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    record = run_calibrate(args) if args.workload == "calibrate" else run_probe(args)
    rank = int(os.environ["NODE_RANK"])
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps([record]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
