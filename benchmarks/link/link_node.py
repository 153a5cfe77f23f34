"""One Lightning node of ``bench_link.py``, run inside its network namespace (not meant to be run by hand).

The orchestrator starts this script once per host with ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``,
``LOCAL_RANK=0``, ``WORLD_SIZE=2`` and ``GLOO_SOCKET_IFNAME`` set, the way a cluster starts one process
per node; every ``Trainer(num_nodes=2, devices=1)`` then joins the same gloo process group (Lightning
creates it in the first fit and reuses it in later ones). Two workloads:

* ``steps``: for every arm (``ARMS``) and both run lengths, a fit of the MLP on random data, arms and
  lengths interleaved in rounds; records per-step times, the bytes this host's veth end transmitted
  during the fit (``/sys/class/net/<if>/statistics/tx_bytes``, read after a barrier so everything sent
  for the fit has left the queue) and the library's own ``gmc/bytes_sent_total``.
* ``tta``: digits, non-IID Dirichlet(0.1) split over the 2 hosts; a fit per (model, method), validating
  on the test split after every epoch; records (training wall time without validation, accuracy).

Each host writes its records to ``<out>.rank<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

_ROOT = Path(__file__).resolve().parents[2]
for _path in (_ROOT, _ROOT / "benchmarks"):  # the package, and the benchmarks' shared harness
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from harness import make_mlp  # noqa: E402

import lightning_gmc  # noqa: E402

# arm -> (label, method, compressor, detach); method None is DDP (compressor "bf16": torch's hook);
# detach None leaves it to the method (methods without a detached point reject any value).
ARMS: dict[str, tuple[str, str | None, str | None, float | None]] = {
    "ddp": ("DDP", None, None, None),
    "ddp_bf16": ("DDP + bf16_compress_hook", None, "bf16", None),
    "gmc_topk": ("GMC topk", "gmc", "topk", None),
    "gmc_topk_approx": ("GMC topk_approx", "gmc", "topk_approx", None),
    "gmc_topk_shared": ("GMC topk_shared", "gmc", "topk_shared", None),
    "gmc_plus_rbgs": ("GMC+ rbgs (detach 0.5)", "gmc", "rbgs", 0.5),
    "ef_topk_approx": ("EF topk_approx", "ef", "topk_approx", None),
    # density="auto", a fixed 10 % and the dense route auto falls back to (bench_plan_link.py's
    # comparison; the density comes from ARM_DENSITY)
    "gmc_topk_approx_auto": ("GMC topk_approx auto", "gmc", "topk_approx", None),
    "gmc_plus_rbgs_auto": ("GMC+ rbgs (detach 0.5) auto", "gmc", "rbgs", 0.5),
    "gmc_topk_approx_10": ("GMC topk_approx", "gmc", "topk_approx", None),
    "gmc_dense": ("GMC dense route (compressor none)", "gmc", "none", None),
}
#: arms whose density is not the command line's --density
ARM_DENSITY: dict[str, float | str] = {
    "gmc_topk_approx_auto": "auto",
    "gmc_plus_rbgs_auto": "auto",
    "gmc_topk_approx_10": 0.1,
    "gmc_dense": 1.0,
}
#: the arms bench_link.py runs by default (the others are bench_plan_link.py's)
DEFAULT_ARMS = [arm for arm in ARMS if arm not in ARM_DENSITY]


def available_arms() -> list[str]:
    """The arms whose method and compressor this version of the library provides."""
    return [
        arm
        for arm, (_, method, comp, _) in ARMS.items()
        if method is None or (method in lightning_gmc.METHODS and comp in lightning_gmc.COMPRESSORS)
    ]


class BF16HookDDPStrategy(DDPStrategy):
    """``DDPStrategy`` with torch's ``bf16_compress_hook`` registered on CPU too (Lightning registers a
    ``ddp_comm_hook`` only on CUDA and would silently run plain DDP here)."""

    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        self.model.register_comm_hook(None, default_hooks.bf16_compress_hook)


def make_strategy(arm: str, density: float) -> Strategy:
    """The Lightning strategy of one arm (gloo everywhere)."""
    _, method, compressor, detach = ARMS[arm]
    if method is None:
        cls = BF16HookDDPStrategy if compressor == "bf16" else DDPStrategy
        return cls(process_group_backend="gloo")
    chosen = ARM_DENSITY.get(arm, density)
    return lightning_gmc.GMCStrategy(
        method=method,
        compressor=compressor,
        density=chosen,  # type: ignore[arg-type]
        detach=detach,
        auto_density={"warmup_steps": 8} if chosen == "auto" else None,
        process_group_backend="gloo",
    )




class MLPModule(LightningModule):
    """Cross-entropy on random data with ``SGD(lr, momentum=0.9)``; logs nothing (no extra collectives)."""

    def __init__(self, dims: list[int], lr: float = 0.01) -> None:
        super().__init__()
        self.net = make_mlp(dims)
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class StepClock(Callback):
    """Wall-clock time at the end of every training batch, and at fit start/end."""

    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0
        self.batch_ends: list[float] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.batch_ends.append(time.perf_counter())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.end = time.perf_counter()


class AccuracyClock(Callback):
    """(training wall time without validation, validation accuracy) after every validation run."""

    def __init__(self) -> None:
        self.start = 0.0
        self.in_validation = 0.0
        self.val_start = 0.0
        self.points: list[tuple[float, float]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        now = time.perf_counter()
        self.in_validation += now - self.val_start
        acc = float(trainer.callback_metrics["val/acc"])
        self.points.append((now - self.start - self.in_validation, acc))


def tx_bytes(interface: str) -> int:
    """Bytes this namespace's ``interface`` has transmitted (kernel counter)."""
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


def _trainer(strategy: Strategy, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=2,
        strategy=strategy,
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _synced_tx(interface: str) -> int:
    # After a barrier the peer has received everything this host sent before it, so none of it is
    # still queued in the rate limiter.
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return tx_bytes(interface)


def fit_steps(arm: str, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fit of ``steps`` optimizer steps of ``arm``; times, link bytes and the library's bytes."""
    seed_everything(0)
    rank = int(os.environ["NODE_RANK"])
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(steps * args.batch, args.dims[0], generator=gen)
    y = torch.randint(0, args.dims[-1], (steps * args.batch,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
    clock = StepClock()
    trainer = _trainer(make_strategy(arm, args.density), [clock], max_steps=steps, limit_val_batches=0)
    before = _synced_tx(args.interface)
    trainer.fit(MLPModule(args.dims), train_dataloaders=loader)
    after = _synced_tx(args.interface)
    metric = trainer.callback_metrics.get("gmc/bytes_sent_total")
    auto = getattr(getattr(trainer.strategy, "gmc_state", None), "auto", None)
    return {
        "auto_history": None if auto is None else auto.history,
        "arm": arm,
        "steps": trainer.global_step,
        "fit_s": clock.end - clock.start,
        "step_s": [b - a for a, b in zip(clock.batch_ends, clock.batch_ends[1:], strict=False)],
        "tx_bytes": after - before,
        "gmc_bytes_sent_total": None if metric is None else float(metric),
        "params": sum(p.numel() for p in trainer.lightning_module.parameters()),
    }


def run_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every arm at both run lengths, interleaved: the arm order rotates and the length order
    alternates between rounds, so slow drifts in background load hit every arm alike."""
    records = []
    for rep in range(args.repeats):
        shift = rep % len(args.arms)
        arms = args.arms[shift:] + args.arms[:shift]
        lengths = args.steps if rep % 2 == 0 else args.steps[::-1]
        for arm in arms:
            for n in lengths:
                rec = fit_steps(arm, n, args)
                rec["repeat"] = rep
                records.append(rec)
    return records


TTA_METHODS = {"ddp": "ddp", "gmc": "gmc_topk_approx", "gmc_plus": "gmc_plus_rbgs"}


def run_tta(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Digits non-IID: accuracy-vs-time curve of each (model, method)."""
    from examples.data import DigitsDataModule
    from examples.models import MLP, ClassificationModule, DigitsCNN

    records = []
    for model_name in args.models:
        for method in args.methods:
            seed_everything(0, workers=True)
            net: nn.Module = DigitsCNN() if model_name == "cnn" else MLP(hidden=(1024, 960))
            dm = DigitsDataModule(partition="dirichlet", alpha=0.1, seed=0, batch_size=16)
            module = ClassificationModule(
                net, lr=0.1, momentum=0.9, weight_decay=1e-4, max_epochs=args.epochs
            )
            clock = AccuracyClock()
            trainer = _trainer(
                make_strategy(TTA_METHODS[method], args.density),
                [clock],
                max_epochs=args.epochs,
                val_check_interval=args.val_check_interval,
            )
            trainer.fit(module, datamodule=dm)
            records.append(
                {
                    "model": model_name,
                    "method": method,
                    "arm": TTA_METHODS[method],
                    "points": clock.points,
                    "steps": trainer.global_step,
                    "params": sum(p.numel() for p in net.parameters()),
                }
            )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload", choices=["steps", "tta"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interface", default="gmc0")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS)
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 40])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 1024, 960, 10])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--methods", nargs="+", default=list(TTA_METHODS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--val-check-interval", type=float, default=0.25, help="fraction of an epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    records = run_steps(args) if args.workload == "steps" else run_tta(args)
    rank = int(os.environ["NODE_RANK"])
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
