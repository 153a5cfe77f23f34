"""Entry point of the multi-process tests: ``python distributed_runner.py config.json``.

Lightning launches the second rank by re-running this script (``start_method="popen"``, as a user's
training script would be). Each rank writes ``rank{r}.pt`` with its final parameters, GMC state and
what it observed; see ``helpers.run_distributed`` for the config keys' meaning. A config with
``cases`` (name -> keys that override the rest) runs one fit per case in the same processes and
writes ``{name}/rank{r}.pt`` (``helpers.run_distributed_cases``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from helpers import loss_fn, make_dataset, make_model
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from torch.futures import Future
from torch.utils.data import DataLoader, TensorDataset

import lightning_gmc
from lightning_gmc.transport import Collectives


class MemoryLogger(Logger):
    """Keeps every logged metric dict (rank 0 only, like every Lightning logger)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append({"step": step, **{k: float(v) for k, v in metrics.items()}})


class Module(L.LightningModule):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = make_model(cfg.get("model", "small"), cfg.get("model_seed", 0))
        self.lrs: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.cfg.get("nan_at_step") is not None and self.trainer.global_step == self.cfg["nan_at_step"]:
            if self.global_rank == self.cfg.get("nan_rank", 0):
                x = x * float("nan")
        loss = loss_fn(self.net, x, y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        # Each rank takes indices rank::world in order (no shuffling), the layout helpers.rank_batch
        # reproduces; Lightning's own DistributedSampler would shuffle.
        x, y = make_dataset(self.cfg.get("num_samples", 256), self.cfg.get("data_seed", 1))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        subset = TensorDataset(x[rank::world], y[rank::world])
        return DataLoader(subset, batch_size=self.cfg.get("batch_size", 16), shuffle=False)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", loss_fn(self.net, x, y), sync_dist=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        opt = self.trainer.optimizers[0]
        self.lrs.append(float(opt.param_groups[0]["lr"]))

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        lr, momentum, wd = cfg.get("lr", 0.1), cfg.get("momentum", 0.9), cfg.get("weight_decay", 0.0)
        # "optimizer": "sgd" (default; "nesterov": true for Nesterov momentum), "adam" or "adamw"
        # ("betas" optional); "two_groups" and "schedule" apply to every one of them.
        name = cfg.get("optimizer", "sgd")
        options: dict[str, Any]
        if name == "sgd":
            optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD
            options = {"momentum": momentum, "nesterov": bool(cfg.get("nesterov", False))}
        elif name in ("adam", "adamw"):
            optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
            options = {"betas": tuple(cfg.get("betas", (0.9, 0.999)))}
        else:
            raise ValueError(f"unknown optimizer {name!r}")
        params: Any = self.parameters()
        if cfg.get("two_groups"):
            first = list(self.net[0].parameters())
            rest = [p for p in self.net.parameters() if all(p is not q for q in first)]
            own = {"lr": lr * 0.5, "weight_decay": wd * 2}
            if name == "sgd":
                own["momentum"] = momentum
            params = [{"params": first, **own}, {"params": rest}]
        optimizer = optimizer_class(params, lr=lr, weight_decay=wd, **options)
        if cfg.get("schedule", "constant") == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["total_steps"])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return optimizer


class CollectiveCounter:
    """A collective back-end that records the bytes each call hands to the one it wraps.

    Installed as the GMC exchange's back-end (``state.exchange.collectives``), so it sees exactly
    the hook's traffic, whatever the torch.distributed API underneath.
    """

    def __init__(self, inner: Collectives) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int]] = []
        self.active = False

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def local_ranks(self) -> Sequence[int]:
        return self.inner.local_ranks

    def _record(self, kind: str, tensor: torch.Tensor) -> None:
        if self.active:
            self.calls.append((kind, tensor.numel() * tensor.element_size()))

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> Future[torch.Tensor]:
        self._record("all_reduce", tensors[0])
        return self.inner.all_reduce_sum(tensors)

    def all_gather(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> Future[torch.Tensor]:
        self._record("all_gather", inputs[0])
        return self.inner.all_gather(inputs, output)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> Future[torch.Tensor]:
        self._record("broadcast", tensors[0])
        return self.inner.broadcast(tensors, src)

    def reduce_scatter_sum(
        self,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        scratch: torch.Tensor | None = None,
    ) -> Future[torch.Tensor]:
        self._record("reduce_scatter", inputs[0])
        return self.inner.reduce_scatter_sum(inputs, outputs, scratch)


class CounterSwitch(L.Callback):
    def __init__(self, counter: CollectiveCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, *args: Any) -> None:
        self.counter.active = True

    def on_train_batch_end(self, *args: Any) -> None:
        self.counter.active = False


class StartState(L.Callback):
    """Keeps the GMC hook state as training starts (after a checkpoint was restored)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, lightning_gmc.GMCStrategy):
            self.state = strategy.gmc_state.state_dict()


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(cfg["out_dir"])
    cases = cfg.pop("cases", None)
    if cases is None:
        train(cfg, out_dir)
        return
    # Several runs, one after another in the same processes (one launch instead of one per case):
    # each has its own strategy, Trainer, model and data; the process group of the first is reused.
    for name, overrides in cases.items():
        (out_dir / name).mkdir(exist_ok=True)
        train({**cfg, **overrides}, out_dir / name)


def train(cfg: dict[str, Any], out_dir: Path) -> None:
    """One fit of ``cfg``; every rank writes ``out_dir / rank{r}.pt``."""
    kwargs = dict(cfg.get("strategy_kwargs", {}))
    kwargs.setdefault("bucket_cap_mb", cfg.get("bucket_cap_mb", 0.25))
    counter = None
    if cfg.get("strategy", "gmc") == "gmc":
        strategy: DDPStrategy = lightning_gmc.GMCStrategy(**kwargs)
        if cfg.get("count_collectives"):
            exchange = strategy.gmc_state.exchange
            counter = CollectiveCounter(exchange.collectives)
            exchange.collectives = counter
    else:
        strategy = DDPStrategy(**kwargs)
    x, y = make_dataset(cfg.get("num_samples", 256), cfg.get("data_seed", 1))
    val_loader = DataLoader(TensorDataset(x, y), batch_size=cfg.get("batch_size", 16), shuffle=False)
    logger = MemoryLogger()
    callbacks: list[L.Callback] = [CounterSwitch(counter)] if counter else []
    start_state = StartState() if cfg.get("record_start_state") else None
    if start_state is not None:
        callbacks.append(start_state)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=cfg.get("devices", 2),
        num_nodes=cfg.get("num_nodes", 1),
        strategy=strategy,
        max_steps=cfg.get("max_steps", 10),
        max_epochs=cfg.get("max_epochs", -1),
        accumulate_grad_batches=cfg.get("accumulate_grad_batches", 1),
        logger=logger,
        log_every_n_steps=cfg.get("log_every_n_steps", 1),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=cfg.get("limit_val_batches", 0),
        precision=cfg.get("precision", "32-true"),
        deterministic=cfg.get("deterministic", False),
        use_distributed_sampler=False,
    )
    module = Module(cfg)
    trainer.fit(module, val_dataloaders=val_loader, ckpt_path=cfg.get("resume_from"))
    if cfg.get("save_checkpoint"):
        trainer.save_checkpoint(cfg["save_checkpoint"])
    result: dict[str, Any] = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "params": {name: p.detach().clone() for name, p in module.net.named_parameters()},
        "lrs": module.lrs,
        "metrics": logger.records,
    }
    result["optimizer_state"] = trainer.optimizers[0].state_dict()
    if isinstance(strategy, lightning_gmc.GMCStrategy):
        state = strategy.gmc_state
        result["gmc_state"] = state.state_dict()
        result["hook_calls"] = state.hook_calls
        result["gmc_step"] = state.step
        result["bucket_numels"] = sorted(b.numel for b in state.worker._buckets.values())
        result["optimizer_groups"] = [
            {k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups
        ]
    if counter is not None:
        result["collective_calls"] = counter.calls
    if start_state is not None:
        result["start_state"] = start_state.state
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
