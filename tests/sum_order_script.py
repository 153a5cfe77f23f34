"""One rank of the 3-rank plain-DDP run behind ``test_sum_order_distributed.py``.

``python sum_order_script.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. For every case it trains the same model three times from the same start:
``STEPS`` steps with small buckets, ``STEPS`` steps with one bucket, and ``STEPS // 2`` steps with small
buckets followed by a resume (a new DDP model, hook state and optimizer loading the saved state, so
the resumed first step runs in DDP's initial bucket order). Each rank saves its parameters and GMC
state after every run in ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lightning_gmc

STEPS = 6
LR = 0.1
#: case -> (method, compressor options, deterministic mode)
CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "rbgs_fp32": ("gmc", {"compressor": "rbgs", "density": 0.05}, False),
    "topk_shared_fp32": ("gmc", {"compressor": "topk_shared", "density": 0.05}, False),
    "none_fp32_deterministic": ("gmc", {"compressor": "none", "density": 1.0}, True),
    "ef21_rbgs_bf16": ("ef21", {"compressor": "rbgs", "density": 0.05, "wire_dtype": "bf16"}, False),
    "none_fp32_ring": ("gmc", {"compressor": "none", "density": 1.0}, False),
}
SMALL_BUCKETS_MB = 0.004  # about a thousand floats per bucket: several buckets after the rebuild
ONE_BUCKET_MB = 25.0


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 5))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)


class Run:
    """One DDP model with the GMC hook, from ``start`` (parameters, GMC state, optimizer state)."""

    def __init__(self, case: str, bucket_cap_mb: float, start: dict[str, Any] | None = None) -> None:
        method_name, options, _ = CASES[case]
        self.model = make_model()
        if start is not None:
            self.model.load_state_dict(start["model"])
        momentum = 0.9 if method_name == "gmc" else 0.0
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=momentum)
        self.ddp = DistributedDataParallel(self.model, bucket_cap_mb=bucket_cap_mb)
        compressor = lightning_gmc.build_compressor(
            options["compressor"], density=options["density"], wire_dtype=options.get("wire_dtype", "fp32")
        )
        self.state = lightning_gmc.GMCHookState(lightning_gmc.build_method(method_name, compressor))
        self.state.attach(self.model, self.optimizer)
        if start is not None:
            self.optimizer.load_state_dict(start["optimizer"])
            self.state.load_state_dict(start["gmc"])
        self.ddp.register_comm_hook(self.state, lightning_gmc.gmc_hook)

    def train(self, rank: int, steps: range) -> None:
        for step in steps:
            x, y = batch(rank, step)
            nn.functional.cross_entropy(self.ddp(x), y).backward()
            self.optimizer.step()
            self.optimizer.zero_grad()

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "gmc": self.state.state_dict(),
            "collectives": self.state.stats.take_step()["collectives"],
        }


def main() -> None:
    out_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results: dict[str, dict[str, Any]] = {}
    for case, (_, _, deterministic) in CASES.items():
        torch.use_deterministic_algorithms(deterministic)
        small = Run(case, SMALL_BUCKETS_MB)
        small.train(rank, range(STEPS))
        one = Run(case, ONE_BUCKET_MB)
        one.train(rank, range(STEPS))
        first = Run(case, SMALL_BUCKETS_MB)
        first.train(rank, range(STEPS // 2))
        resumed = Run(case, SMALL_BUCKETS_MB, start=first.snapshot())
        resumed.train(rank, range(STEPS // 2, STEPS))
        results[case] = {
            "small_buckets": small.snapshot(),
            "one_bucket": one.snapshot(),
            "resumed": resumed.snapshot(),
            "buckets": len(small.state.worker._buckets) if small.state.worker is not None else 0,
        }
    torch.use_deterministic_algorithms(False)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
