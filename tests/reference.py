"""Every method's update rule and the compressors it needs, written out by hand: the one independent
reference the tests compare the implementation with.

Each rule is transcribed from ``docs/algorithms.md`` (section 2, which cites the GMC paper's sections
and algorithms) and appears here once, next to its equations; changing a rule means editing it here.
Nothing here calls ``lightning_gmc`` except the documented shared-seed hash that RBGS draws its block
starts from (:func:`lightning_gmc.compressors.mix_seed`), so a bug in a method, the transport or the
hook shows up as a mismatch that a comparison with the simulator (which runs the same method code)
cannot show.

A rule trains a :class:`Problem`: ``K`` workers, each with a gradient oracle ``g_k(x)`` at step
``t``, a start point ``w_0`` and the parameters' layout. Vectors are flat (every parameter, in the
model's order, concatenated); compressors act per parameter on that layout. Notation as in
``docs/algorithms.md`` section 1: ``w`` the model, ``e_k`` worker k's residual, ``m`` a momentum,
``beta`` the momentum coefficient, ``wd`` coupled L2 weight decay, ``eta_t = lrs[t]``, ``C`` the
compressor, ``mean_k`` the average over workers. Arithmetic runs in the problem's dtype: float64 for
the in-process problems (``tests/quadratic.py``, the hook tests), float32 for the replays of a
multi-process run (``helpers.replay_gmc``), whose gradients and top-k selections must be the run's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lightning_gmc.compressors import mix_seed

Segments = Sequence[tuple[int, int]]
"""``(offset, numel)`` of each parameter in a flat vector."""

Gradient = Callable[[int, torch.Tensor, int], torch.Tensor]
"""``g(k, x, t)``: worker k's gradient at the flat point ``x`` on its data of step ``t``."""


def segments(numels: Sequence[int]) -> list[tuple[int, int]]:
    """The layout of parameters of ``numels`` elements, one after another."""
    out, offset = [], 0
    for n in numels:
        out.append((offset, n))
        offset += n
    return out


@dataclass(frozen=True)
class Problem:
    """What a rule trains: ``workers`` gradient oracles, the flat start point ``w0`` and the parameter
    shapes (name -> shape, in the flat vector's order)."""

    shapes: dict[str, tuple[int, ...]]
    w0: torch.Tensor
    gradient: Gradient
    workers: int

    @property
    def segments(self) -> list[tuple[int, int]]:
        return segments([math.prod(shape) for shape in self.shapes.values()])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The flat vector as one tensor per parameter (views)."""
        return {
            name: flat[offset : offset + n].view(shape)
            for (name, shape), (offset, n) in zip(self.shapes.items(), self.segments, strict=True)
        }


@dataclass
class Run:
    """What a rule returns; fields a method has no use for stay empty."""

    w: torch.Tensor
    """The final model (CSER: worker 0's; every worker's in ``models``)."""
    residual: list[torch.Tensor] = field(default_factory=list)
    """Per worker: the error-feedback residual ``e_k`` (EF21: the gradient estimate ``h_k``)."""
    momentum: torch.Tensor | None = None
    """The shared momentum ``m`` (GMC, Algorithm 3) or EF21's shared aggregate ``h``."""
    models: list[torch.Tensor] = field(default_factory=list)
    """CSER: every worker's own model ``x_k``."""
    directions: list[torch.Tensor] = field(default_factory=list)
    """EF, EF21: per step, the vector the optimizer stepped on."""
    supports: list[list[torch.Tensor]] = field(default_factory=list)
    """CSER: per message sent (every step's C1, every reset's C2), each worker's support."""


# ------------------------------------------------------------------------------------ compressors
class Compressor(Protocol):
    def __call__(self, u: torch.Tensor, step: int, layout: Segments) -> torch.Tensor:
        """``C(u)`` of the flat ``u`` at optimizer step ``step``, per parameter of ``layout``."""
        ...


class Sparsifier:
    """A compressor that sends a subset of coordinates as they are: ``C(u) = u`` on the support, 0
    elsewhere. DGC's momentum masking and CSER's traffic count need the support itself."""

    def support(self, u: torch.Tensor, step: int, layout: Segments) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, u: torch.Tensor, step: int, layout: Segments) -> torch.Tensor:
        return torch.where(self.support(u, step, layout), u, torch.zeros_like(u))


def selected(density: float, numel: int) -> int:
    """``k = max(1, floor(density * n))`` coordinates per parameter (docs/algorithms.md 3.6)."""
    return max(1, math.floor(density * numel + 1e-9))


@dataclass(frozen=True)
class TopK(Sparsifier):
    """Per parameter, the ``k`` largest magnitudes; on equal magnitudes the lower index wins."""

    density: float

    def support(self, u: torch.Tensor, step: int, layout: Segments) -> torch.Tensor:
        mask = torch.zeros(u.numel(), dtype=torch.bool)
        for offset, n in layout:
            order = torch.argsort(u[offset : offset + n].abs(), descending=True, stable=True)
            mask[offset + order[: selected(self.density, n)]] = True
        return mask


RBGS_STREAM = mix_seed(*b"rbgs")


@dataclass(frozen=True)
class RBGS(Sparsifier):
    """Random block gradient sparsification (the GMC paper's section 5): per parameter, ``k``
    contiguous coordinates, wrapping around, from the start ``mix_seed(seed, step, stream("rbgs"),
    parameter index) mod n``, which every worker draws alike (docs/algorithms.md 3.6)."""

    density: float
    seed: int

    def support(self, u: torch.Tensor, step: int, layout: Segments) -> torch.Tensor:
        mask = torch.zeros(u.numel(), dtype=torch.bool)
        for index, (offset, n) in enumerate(layout):
            start = mix_seed(self.seed, step, RBGS_STREAM, index) % n
            mask[offset + (start + torch.arange(selected(self.density, n))) % n] = True
        return mask


class Identity(Sparsifier):
    """No compression: every coordinate is sent."""

    def support(self, u: torch.Tensor, step: int, layout: Segments) -> torch.Tensor:
        return torch.ones(u.numel(), dtype=torch.bool)

    def __call__(self, u: torch.Tensor, step: int, layout: Segments) -> torch.Tensor:
        return u.clone()


class ScaledSign:
    """Per parameter ``(||u||_1 / n) * sign(u)``, zeros sent as ``+`` (docs/compressors.md)."""

    def __call__(self, u: torch.Tensor, step: int, layout: Segments) -> torch.Tensor:
        out = torch.empty_like(u)
        for offset, n in layout:
            chunk = u[offset : offset + n]
            sign = torch.where(torch.signbit(chunk), -1.0, 1.0).to(u.dtype)
            out[offset : offset + n] = chunk.abs().mean() * sign
        return out


# ---------------------------------------------------------------------------------- update rules
def _gradient(
    problem: Problem, k: int, x: torch.Tensor, t: int, skip: tuple[int, int] | None
) -> torch.Tensor:
    """``g_k(x)`` at step t; zero for ``skip = (t, k)`` (a bucket skipped as non-finite counts as a
    zero gradient, docs/algorithms.md 3.10)."""
    return torch.zeros_like(x) if skip == (t, k) else problem.gradient(k, x, t)


def sgd(
    problem: Problem, lrs: Sequence[float], *, momentum: float, wd: float, clip: float | None = None
) -> torch.Tensor:
    """DMSGD, section 2.1 (the paper's eq. (3)), i.e. plain DDP: ``torch.optim.SGD(momentum, weight_decay)``
    on ``mean_k g_k(w_t)``. ``clip``: each worker's gradient first clipped per parameter by
    ``torch.nn.utils.clip_grad_norm_`` (DGC's local clipping, section 2.4)."""
    w = problem.w0.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=lrs[0], momentum=momentum, weight_decay=wd)
    for t, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        grads = []
        for k in range(problem.workers):
            g = problem.gradient(k, w.detach(), t)
            if clip is not None:
                parts = []
                for offset, n in problem.segments:
                    holder = torch.nn.Parameter(torch.zeros(n, dtype=g.dtype))
                    holder.grad = g[offset : offset + n].clone()
                    torch.nn.utils.clip_grad_norm_([holder], clip)
                    parts.append(holder.grad)
                g = torch.cat(parts)
            grads.append(g)
        w.grad = sum(grads) / problem.workers
        optimizer.step()
    return w.detach()


def gmc(
    problem: Problem,
    lrs: Sequence[float],
    compress: Compressor,
    *,
    beta: float,
    wd: float,
    detach: float = 0.0,
    convention: str = "prev",
    zero_gradient: tuple[int, int] | None = None,
) -> Run:
    """GMC (section 2.2; the paper's section 3, Algorithm 1 in all-reduce form) and GMC+ for
    ``detach > 0`` (section 2.3; the paper's section 4, Algorithm 2)::

        x_k     = w_t - lambda * eta_t * e_k          the gradient point (w_t for GMC)
        u_k     = e_k + g_k(x_k) + wd * x_k + beta * s_t * m_{t-1}
        e_k    <- u_k - C(u_k)
        m_t     = mean_k C(u_k)
        w_{t+1} = w_t - eta_t * m_t

    with ``s_t = 1`` (``convention="prev"``) or ``eta_{t-1} / eta_t`` (``"cur"``, section 3.1).
    ``zero_gradient=(t, k)``: worker k's gradient at step t counts as zero.
    """
    K, layout = problem.workers, problem.segments
    w = problem.w0.clone()
    e = [torch.zeros_like(w) for _ in range(K)]
    m = torch.zeros_like(w)
    for t, lr in enumerate(lrs):
        prev_lr = lrs[t - 1] if t else lr
        coef = beta * (prev_lr / lr if convention == "cur" else 1.0)
        sent = []
        for k in range(K):
            x = w - (detach * lr) * e[k]
            u = ((e[k] + _gradient(problem, k, x, t, zero_gradient)) + wd * x) + coef * m
            c = compress(u, t, layout)
            e[k] = u - c
            sent.append(c)
        m = sum(sent) / K
        w = w - lr * m
    return Run(w, residual=e, momentum=m)


def ef_server_momentum(
    problem: Problem,
    lrs: Sequence[float],
    compress: Compressor,
    *,
    beta: float,
    wd: float,
    detach: float = 0.0,
) -> Run:
    """Algorithm 3 of the paper's Appendix A (section 2.7), with GMC+'s detached point for
    ``detach > 0`` (section 2.9; ``detach = 0`` is Algorithm 3)::

        x_k     = w_t - lambda * eta_t * e_k
        p_k     = e_k + g_k(x_k) + wd * x_k
        e_k    <- p_k - C(p_k)                      the residual holds no momentum
        m_t     = beta * m_{t-1} + mean_k C(p_k)    momentum on the aggregate
        w_{t+1} = w_t - eta_t * m_t
    """
    K, layout = problem.workers, problem.segments
    w = problem.w0.clone()
    e = [torch.zeros_like(w) for _ in range(K)]
    m = torch.zeros_like(w)
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            x = w - detach * lr * e[k]
            p = e[k] + problem.gradient(k, x, t) + wd * x
            c = compress(p, t, layout)
            e[k] = p - c
            sent.append(c)
        m = beta * m + sum(sent) / K
        w = w - lr * m
    return Run(w, residual=e, momentum=m)


def gmc_lr_inside(
    problem: Problem, lrs: Sequence[float], compress: Compressor, *, beta: float, wd: float
) -> torch.Tensor:
    """Algorithm 4 of the paper's Appendix A (section 2.8), the residual in parameter units::

    u'_k    = e'_k + eta_t * (g_k(w_t) + wd * w_t) + beta * (w_{t-1} - w_t)
    e'_k   <- u'_k - C(u'_k)
    w_{t+1} = w_t - mean_k C(u'_k)              w_{-1} = w_0
    """
    K, layout = problem.workers, problem.segments
    w_prev, w = problem.w0.clone(), problem.w0.clone()
    e = [torch.zeros_like(w) for _ in range(K)]
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            u = e[k] + lr * (problem.gradient(k, w, t) + wd * w) + beta * (w_prev - w)
            c = compress(u, t, layout)
            e[k] = u - c
            sent.append(c)
        w_prev, w = w, w - sum(sent) / K
    return w


def dgc(
    problem: Problem,
    lrs: Sequence[float],
    compress: Sparsifier,
    *,
    beta: float,
    wd: float,
    masking: bool,
    wd_local: bool = False,
) -> torch.Tensor:
    """DGC (section 2.4; Lin et al., the paper's Remark 2), in the order of the official DGC code::

        g_k  = g_k(w_t) + wd * w_t                  (wd_local: no wd here, see below)
        u_k  = beta * u_k + g_k                     local momentum
        v_k  = v_k + u_k                            local accumulation
        send C(v_k);  v_k[selected] = 0
        u_k[selected] = 0                           only with momentum masking ("w/ mfm")
        w_{t+1} = w_t - eta_t * mean_k C(v_k)

    ``wd_local``: the DGC code's weight decay, uncompressed, with its own momentum
    ``b_t = beta * b_{t-1} + wd * w_t`` and ``w_{t+1} = w_t - eta_t * (mean_k C(v_k) + b_t)``.
    """
    K, layout = problem.workers, problem.segments
    w = problem.w0.clone()
    u = [torch.zeros_like(w) for _ in range(K)]
    v = [torch.zeros_like(w) for _ in range(K)]
    b = torch.zeros_like(w)
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            g = problem.gradient(k, w, t) + (0.0 if wd_local else wd * w)
            u[k] = beta * u[k] + g
            v[k] = v[k] + u[k]
            chosen = compress.support(v[k], t, layout)
            sent.append(torch.where(chosen, v[k], torch.zeros_like(v[k])))
            v[k] = torch.where(chosen, torch.zeros_like(v[k]), v[k])
            if masking:
                u[k] = torch.where(chosen, torch.zeros_like(u[k]), u[k])
        update = sum(sent) / K
        if wd_local:
            b = beta * b + wd * w
            update = update + b
        w = w - lr * update
    return w


def cser(
    problem: Problem,
    lrs: Sequence[float],
    compress: Sparsifier,
    reset: Sparsifier,
    *,
    period: int,
    beta: float,
    wd: float,
) -> Run:
    """M-CSER (section 2.5; Xie et al.): a model per worker, ``C1 = compress`` every step, the error
    reset ``C2 = reset`` after every ``period`` steps::

        m_k  = beta * m_k + g_k(x_k) + wd * x_k     at the worker's own model
        d_k  = eta_t * m_k
        x_k <- x_k - mean_j C1(d_j) - (d_k - C1(d_k))
        r_k <- r_k + (d_k - C1(d_k))
        after step t when (t + 1) mod H = 0:
          x_k <- x_k + C2(r_k) - mean_j C2(r_j);  r_k <- r_k - C2(r_k)

    Returns every worker's model and residual, and each message's supports (for RCC).
    """
    K, layout = problem.workers, problem.segments
    x = [problem.w0.clone() for _ in range(K)]
    m = [torch.zeros_like(problem.w0) for _ in range(K)]
    r = [torch.zeros_like(problem.w0) for _ in range(K)]
    supports = []
    for t, lr in enumerate(lrs):
        deltas = []
        for k in range(K):
            m[k] = beta * m[k] + problem.gradient(k, x[k], t) + wd * x[k]
            deltas.append(lr * m[k])
        supports.append([compress.support(d, t, layout) for d in deltas])
        synced = [compress(d, t, layout) for d in deltas]
        dbar = sum(synced) / K
        for k in range(K):
            remainder = deltas[k] - synced[k]
            x[k] = x[k] - dbar - remainder
            r[k] = r[k] + remainder
        if (t + 1) % period == 0:
            supports.append([reset.support(r[k], t, layout) for k in range(K)])
            resets = [reset(r[k], t, layout) for k in range(K)]
            ebar = sum(resets) / K
            for k in range(K):
                x[k] = x[k] + resets[k] - ebar
                r[k] = r[k] - resets[k]
    return Run(x[0], residual=r, models=x, supports=supports)


def def_a(
    problem: Problem, lrs: Sequence[float], compress: Compressor, *, c: float, beta: float, wd: float
) -> Run:
    """DEF-A (section 2.6; Xu and Huang, as the paper runs it in section 4), residual in parameter
    units::

        y_k     = w_t - c * e_k                     detached point
        m_k     = beta * m_k + g_k(y_k) + wd * y_k  local momentum
        p_k     = e_k + eta_t * m_k
        e_k    <- p_k - C(p_k)
        w_{t+1} = w_t - mean_k C(p_k)
    """
    K, layout = problem.workers, problem.segments
    w = problem.w0.clone()
    e = [torch.zeros_like(w) for _ in range(K)]
    m = [torch.zeros_like(w) for _ in range(K)]
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            y = w - c * e[k]
            m[k] = beta * m[k] + problem.gradient(k, y, t) + wd * y
            p = e[k] + lr * m[k]
            cp = compress(p, t, layout)
            e[k] = p - cp
            sent.append(cp)
        w = w - sum(sent) / K
    return Run(w, residual=e)


def ef_local_momentum(
    problem: Problem, lrs: Sequence[float], compress: Compressor, *, beta: float, wd: float
) -> torch.Tensor:
    """Error feedback on the local-momentum step, in parameter units, the gradient at the model
    itself (what DEF-A with ``c = 0`` must be, section 2.6)::

        v_k     = beta * v_k + g_k(w_t) + wd * w_t
        p_k     = memory_k + eta_t * v_k
        memory_k <- p_k - C(p_k)
        w_{t+1} = w_t - mean_k C(p_k)
    """
    K, layout = problem.workers, problem.segments
    w = problem.w0.clone()
    memory = [torch.zeros_like(w) for _ in range(K)]
    velocity = [torch.zeros_like(w) for _ in range(K)]
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            velocity[k] = beta * velocity[k] + problem.gradient(k, w, t) + wd * w
            corrected = memory[k] + lr * velocity[k]
            sent.append(compress(corrected, t, layout))
            memory[k] = corrected - sent[-1]
        w = w - sum(sent) / K
    return w


OptimizerStep = Callable[[torch.Tensor, int], torch.Tensor]
"""``step(direction, t)``: the user's optimizer stepping on ``direction``; returns the new model."""


def ef(
    problem: Problem,
    steps: int,
    compress: Compressor,
    optimizer_step: OptimizerStep,
    zero_gradient: tuple[int, int] | None = None,
) -> Run:
    """Error feedback under the user's optimizer (section 2.10; not in the paper)::

    p_k   = e_k + g_k(w_t)
    e_k  <- p_k - C(p_k)
    g_t   = mean_k C(p_k)
    w_{t+1} = optimizer.step(w_t, g_t)
    """
    K, layout = problem.workers, problem.segments
    w = problem.w0.clone()
    e = [torch.zeros_like(w) for _ in range(K)]
    directions = []
    for t in range(steps):
        sent = []
        for k in range(K):
            p = e[k] + _gradient(problem, k, w, t, zero_gradient)
            c = compress(p, t, layout)
            e[k] = p - c
            sent.append(c)
        directions.append(sum(sent) / K)
        w = optimizer_step(directions[-1], t)
    return Run(w, residual=e, directions=directions)


def ef21(
    problem: Problem,
    steps: int,
    compress: Compressor,
    optimizer_step: OptimizerStep,
    zero_gradient: tuple[int, int] | None = None,
) -> Run:
    """EF21 (section 2.11; Richtarik et al. 2021, Algorithm 1) from zero estimates, under the user's
    optimizer::

        c_k  = C(g_k(w_t) - h_k)
        h_k <- h_k + c_k
        h   <- h + mean_k c_k
        w_{t+1} = optimizer.step(w_t, h)

    ``residual`` holds the estimates ``h_k``, ``momentum`` the aggregate ``h``.
    """
    K, layout = problem.workers, problem.segments
    w = problem.w0.clone()
    h = [torch.zeros_like(w) for _ in range(K)]
    aggregate = torch.zeros_like(w)
    directions = []
    for t in range(steps):
        sent = []
        for k in range(K):
            c = compress(_gradient(problem, k, w, t, zero_gradient) - h[k], t, layout)
            h[k] = h[k] + c
            sent.append(c)
        aggregate = aggregate + sum(sent) / K
        directions.append(aggregate.clone())
        w = optimizer_step(directions[-1], t)
    return Run(w, residual=h, momentum=aggregate, directions=directions)
