"""GMC / GMC+ written out by hand, replaying a ``distributed_runner.py`` run: an independent reference.

The replay rebuilds the runner's model, per-rank batches and learning rates in-process and applies the
update rules of the GMC paper (Algorithm 1 in all-reduce form; GMC+'s detached point) with plain
tensor operations, one parameter at a time. It calls nothing from ``lightning_gmc`` except the
documented shared-seed hash that RBGS draws its block starts from, so a bug in a method, the
transport or the hook shows up as a mismatch, which a comparison with the simulator (which runs the
same method code) cannot show.

Per rank k and step t, per parameter::

    x_k = w_t - detach * lr_t * e_k                     (the gradient point; w_t for GMC)
    u_k = e_k + g_k(x_k) + wd * x_k + beta * c_t * m
    e_k = u_k - C(u_k)
    m   = (1/K) sum_k C(u_k)
    w_{t+1} = w_t - lr_t * m

with ``c_t = 1`` (``"prev"``) or ``lr_{t-1} / lr_t`` (``"cur"``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from helpers import loss_fn, make_dataset, make_model, rank_batch

from lightning_gmc.compressors import mix_seed

Compress = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``C(u, step, param_index)`` for one parameter's flat ``u``."""


def topk_by_hand(density: float) -> Compress:
    """Keep the ``max(1, floor(density n))`` largest magnitudes of each parameter."""

    def compress(u: torch.Tensor, step: int, index: int) -> torch.Tensor:
        k = max(1, math.floor(density * u.numel() + 1e-9))
        keep = torch.argsort(u.abs(), descending=True, stable=True)[:k]
        out = torch.zeros_like(u)
        out[keep] = u[keep]
        return out

    return compress


def rbgs_by_hand(density: float, seed: int) -> Compress:
    """RBGS: a contiguous block of ``k`` coordinates (wrapping around) starting at the shared-seed
    draw ``mix_seed(seed, step, stream("rbgs"), param_index) mod n``, the same on every rank."""
    stream = mix_seed(*b"rbgs")

    def compress(u: torch.Tensor, step: int, index: int) -> torch.Tensor:
        n = u.numel()
        k = max(1, math.floor(density * n + 1e-9))
        start = mix_seed(seed, step, stream, index) % n
        keep = (start + torch.arange(k)) % n
        out = torch.zeros_like(u)
        out[keep] = u[keep]
        return out

    return compress


def scaled_sign_by_hand() -> Compress:
    """Scaled sign per parameter: ``(||u||_1 / n) sign(u)``, zeros sent as ``+``."""

    def compress(u: torch.Tensor, step: int, index: int) -> torch.Tensor:
        sign = torch.where(torch.signbit(u), -1.0, 1.0).to(u.dtype)
        return u.abs().mean() * sign

    return compress


def identity_by_hand() -> Compress:
    return lambda u, step, index: u.clone()


def replay_gmc(
    cfg: dict[str, Any],
    lrs: list[float],
    compress: Compress,
    world_size: int = 2,
    zero_gradient: tuple[int, int] | None = None,
    autocast_bf16: bool = False,
) -> dict[str, Any]:
    """Replay a runner config (``model``, ``batch_size``, ``momentum``, ``weight_decay``,
    ``strategy_kwargs.detach`` / ``method_options.momentum_lr_convention``) for the given per-step
    learning rates.

    Args:
        zero_gradient: ``(step, rank)`` whose gradient counts as zero (a skipped non-finite bucket).
        autocast_bf16: evaluate forward and loss under CPU bf16 autocast (``precision="bf16-mixed"``).

    Returns:
        ``params`` (final w), ``residual`` (per rank) and ``momentum``, each by parameter name.
    """
    torch.set_num_threads(1)  # the runner's ranks use one thread: same matmul rounding
    strategy = cfg.get("strategy_kwargs", {})
    detach = float(strategy.get("detach", 0.0))
    convention = strategy.get("method_options", {}).get("momentum_lr_convention", "prev")
    beta, wd = float(cfg["momentum"]), float(cfg.get("weight_decay", 0.0))
    model = make_model(cfg.get("model", "small"), cfg.get("model_seed", 0))
    data = make_dataset(cfg.get("num_samples", 256), cfg.get("data_seed", 1))
    names = [name for name, _ in model.named_parameters()]
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    e = [{name: torch.zeros_like(t) for name, t in w.items()} for _ in range(world_size)]
    m = {name: torch.zeros_like(t) for name, t in w.items()}
    for step, lr in enumerate(lrs):
        prev_lr = lrs[step - 1] if step else lr
        coef = beta * (prev_lr / lr if convention == "cur" else 1.0)
        sent = []
        for rank in range(world_size):
            x = {name: w[name] - (detach * lr) * e[rank][name] for name in names}
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(x[name])
            model.zero_grad()
            xb, yb = rank_batch(data, rank, world_size, cfg["batch_size"], step)
            autocast = (
                torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
            )
            with autocast:
                loss = loss_fn(model, xb, yb)
            loss.backward()
            compressed = {}
            for index, (name, p) in enumerate(model.named_parameters()):
                g = torch.zeros_like(p) if zero_gradient == (step, rank) else p.grad.detach()
                u = ((e[rank][name] + g) + wd * x[name]) + coef * m[name]
                c = compress(u.reshape(-1), step, index).view_as(u)
                e[rank][name] = u - c
                compressed[name] = c
            sent.append(compressed)
        m = {name: sum(c[name] for c in sent) / world_size for name in names}
        w = {name: w[name] - lr * m[name] for name in names}
    return {"params": w, "residual": e, "momentum": m}


def assert_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name].to(tensor.dtype), tensor, msg=name, rtol=rtol, atol=atol)


def replay_sgd(cfg: dict[str, Any], lrs: list[float], world_size: int = 2) -> dict[str, torch.Tensor]:
    """Plain DDP with ``torch.optim.SGD(momentum, weight_decay)``: the mean of the ranks' gradients at
    the shared parameters, one optimizer step per learning rate (the dense methods' degeneracy)."""
    torch.set_num_threads(1)
    model = make_model(cfg.get("model", "small"), cfg.get("model_seed", 0))
    data = make_dataset(cfg.get("num_samples", 256), cfg.get("data_seed", 1))
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=lrs[0],
        momentum=float(cfg["momentum"]),
        weight_decay=cfg.get("weight_decay", 0.0),
    )
    for step, lr in enumerate(lrs):
        grads: dict[str, torch.Tensor] = {}
        for rank in range(world_size):
            model.zero_grad()
            xb, yb = rank_batch(data, rank, world_size, cfg["batch_size"], step)
            loss_fn(model, xb, yb).backward()
            for name, p in model.named_parameters():
                grads[name] = grads.get(name, 0) + p.grad / world_size
        for name, p in model.named_parameters():
            p.grad = grads[name]
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}
