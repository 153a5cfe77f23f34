"""One run of the non-IID study (``examples/noniid_study.py``): one arm, one seed, K simulated workers.

:class:`SeedPlan` fixes everything random of a seed (initialisation, Dirichlet partition, batch order);
:func:`run_one` trains an arm whose method applies the momentum SGD step itself, and
:func:`run_one_with_optimizer` one that leaves a ``torch.optim`` optimizer in charge (``ef``). Both
evaluate the same way after every epoch (:func:`_train_and_evaluate`).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from examples.data import DigitsDataModule, SyntheticDataModule
from examples.models import MLP, DigitsCNN
from lightning_gmc import Simulator

__all__ = ["Problem", "SeedPlan", "run_one", "run_one_with_optimizer"]


@dataclass(frozen=True)
class Problem:
    """The data set and model of a study: scikit-learn's digits with :class:`DigitsCNN` (default), or
    the generated Gaussian mixture of :class:`~examples.data.SyntheticDataModule` (``train_size``
    samples, so that many workers each get enough) with an :class:`MLP`."""

    data: str = "digits"
    train_size: int = 9600
    test_size: int = 2000
    num_features: int = 64
    num_classes: int = 10
    separation: float = 0.5

    def model(self) -> nn.Module:
        if self.data == "digits":
            return DigitsCNN()
        return MLP(self.num_features, self.num_classes, hidden=(128,))

    def data_module(self, workers: int, alpha: float, seed: int) -> Any:
        if self.data == "digits":
            return DigitsDataModule(partition="dirichlet", alpha=alpha, seed=seed, num_shards=workers)
        return SyntheticDataModule(
            num_features=self.num_features,
            num_classes=self.num_classes,
            train_size=self.train_size,
            test_size=self.test_size,
            separation=self.separation,
            partition="dirichlet",
            alpha=alpha,
            seed=seed,
            num_shards=workers,
        )


@dataclass(frozen=True)
class SeedPlan:
    """Everything random in one seed's runs, derived from ``seed`` alone."""

    seed: int
    problem: Problem = Problem()

    def init_params(self) -> dict[str, Tensor]:
        """The model's initialisation of this seed (the same for every arm)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.problem.model()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def shards(self, workers: int, alpha: float) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
        """Per-worker training tensors of this seed's Dirichlet partition, and the (fixed) test set."""
        data = self.problem.data_module(workers, alpha, self.seed)
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
    model = plan.problem.model()
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

    def train_epoch(epoch: int) -> nn.Module:
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
        return model

    return _train_and_evaluate(train_epoch, args.epochs, sim, test)


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
    model = plan.problem.model()
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

    def train_epoch(epoch: int) -> nn.Module:
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
        return model

    return _train_and_evaluate(train_epoch, args.epochs, sim, test)


def _train_and_evaluate(
    train_epoch: Callable[[int], nn.Module], epochs: int, sim: Simulator, test: tuple[Tensor, Tensor]
) -> dict[str, Any]:
    """The loop and evaluation both run functions share: ``train_epoch(epoch)`` trains one epoch and
    returns the model to evaluate (the method's evaluation model), whose test accuracy and loss are
    recorded after every epoch. Returns those curves, the run's RCC and its wall time."""
    loss_fn = nn.CrossEntropyLoss()
    curve: list[float] = []
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model = train_epoch(epoch)
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
