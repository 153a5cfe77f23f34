"""The baseline methods' update rules written out by hand, and a simulator driver to compare them with.

Shared by ``tests/test_methods_reference.py`` and ``tests/test_ef_server_momentum.py``. References
(docs/algorithms.md): 2.1 (DMSGD), 2.2 (GMC), 2.7-2.8 (the paper's Algorithms 3 and 4), 2.4 (DGC, the
paper's Remark 2), 2.5 (CSER / M-CSER), 2.6 (DEF-A). Every reference below is an independent float64
loop over K = 2 workers (or ``torch.optim.SGD``) on per-worker noisy quadratics; none calls the
implementation. :func:`simulate` runs the implementation (:class:`lightning_gmc.Simulator`) on the
same problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lightning_gmc import Simulator

SHAPES = {"a": (2, 3), "b": (4,)}
K = 2
BETA = 0.9
WD = 0.01
DENSITY = 0.34  # top-k keeps 2 of a's 6 and 1 of b's 4 coordinates
LRS3 = [0.1, 0.07, 0.05]  # three steps with a changing learning rate
COSINE = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 12)) + 1e-3 for t in range(12)]

Compress = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------ problem
def _segments() -> list[tuple[int, int]]:
    out, offset = [], 0
    for shape in SHAPES.values():
        n = math.prod(shape)
        out.append((offset, n))
        offset += n
    return out


D = sum(n for _, n in _segments())


def _problem(seed: int = 0) -> Callable[[int, torch.Tensor, int], torch.Tensor]:
    """Per-worker noisy quadratics (different optima: non-IID), float64."""
    gen = torch.Generator().manual_seed(seed)
    diag = [torch.rand(D, generator=gen, dtype=torch.float64) * 1.5 + 0.5 for _ in range(K)]
    target = [torch.randn(D, generator=gen, dtype=torch.float64) * 2 for _ in range(K)]
    noise = [[0.1 * torch.randn(D, generator=gen, dtype=torch.float64) for _ in range(K)] for _ in range(40)]

    def grad(k: int, w: torch.Tensor, t: int) -> torch.Tensor:
        return diag[k] * w.double() - target[k] + noise[t][k]

    return grad


GRAD = _problem()
W0 = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)


def _split(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape).to(torch.float32).clone()
        offset += n
    return out


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name in SHAPES]).double()


# ------------------------------------------------------------------------ hand compressors
def topk(x: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter top-k by magnitude, k = max(1, floor(density * n)): (C(x), selection mask)."""
    out, mask = torch.zeros_like(x), torch.zeros(x.numel(), dtype=torch.bool)
    for offset, n in _segments():
        k = max(1, math.floor(density * n + 1e-9))
        chunk = x[offset : offset + n]
        for i in sorted(range(n), key=lambda i: -abs(float(chunk[i])))[:k]:
            out[offset + i] = chunk[i]
            mask[offset + i] = True
    return out, mask


def identity(x: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.clone(), torch.ones(x.numel(), dtype=torch.bool)


# ------------------------------------------------------------------------ hand references
def dgc_by_hand(compress: Compress, lrs: list[float], mfm: bool, wd_local: bool = False) -> torch.Tensor:
    """docs/algorithms.md 2.4: u = beta u + g; v += u; send C(v); v[sel] = 0; mfm: u[sel] = 0."""
    w = W0.clone()
    u = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    v = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    b = torch.zeros(D, dtype=torch.float64)  # DGC code's local weight-decay momentum
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            g = GRAD(k, w, t) + (0.0 if wd_local else WD * w)
            u[k] = BETA * u[k] + g
            v[k] = v[k] + u[k]
            c, mask = compress(v[k], DENSITY)
            v[k] = torch.where(mask, torch.zeros_like(v[k]), v[k])
            if mfm:
                u[k] = torch.where(mask, torch.zeros_like(u[k]), u[k])
            sent.append(c)
        update = sum(sent) / K
        if wd_local:
            b = BETA * b + WD * w
            update = update + b
        w = w - lr * update
    return w


def cser_by_hand(
    c1: Compress, d1: float, c2: Compress, d2: float, period: int, lrs: list[float]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """docs/algorithms.md 2.5 (M-CSER): per-worker models, error reset every ``period`` steps."""
    x = [W0.clone() for _ in range(K)]
    m = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    r = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    for t, lr in enumerate(lrs, start=1):
        deltas = []
        for k in range(K):
            g = GRAD(k, x[k], t - 1) + WD * x[k]
            m[k] = BETA * m[k] + g
            deltas.append(lr * m[k])
        synced = [c1(d, d1)[0] for d in deltas]
        dbar = sum(synced) / K
        for k in range(K):
            remainder = deltas[k] - synced[k]
            x[k] = x[k] - dbar - remainder
            r[k] = r[k] + remainder
        if t % period == 0:
            resets = [c2(r[k], d2)[0] for k in range(K)]
            ebar = sum(resets) / K
            for k in range(K):
                x[k] = x[k] + resets[k] - ebar
                r[k] = r[k] - resets[k]
    return x, r


def def_a_by_hand(compress: Compress, lrs: list[float], c: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """docs/algorithms.md 2.6: y = x - c e; m = beta m + g(y) + wd y; p = e + lr m; e = p - C(p)."""
    x = W0.clone()
    e = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    m = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            y = x - c * e[k]
            m[k] = BETA * m[k] + GRAD(k, y, t) + WD * y
            p = e[k] + lr * m[k]
            cp = compress(p, DENSITY)[0]
            e[k] = p - cp
            sent.append(cp)
        x = x - sum(sent) / K
    return x, e


def ef_local_momentum_by_hand(compress: Compress, lrs: list[float]) -> torch.Tensor:
    """Error feedback on the local-momentum step (parameter units), gradient at the model itself."""
    x = W0.clone()
    memory = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    velocity = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            velocity[k] = BETA * velocity[k] + GRAD(k, x, t) + WD * x
            corrected = memory[k] + lr * velocity[k]
            sent.append(compress(corrected, DENSITY)[0])
            memory[k] = corrected - sent[-1]
        x = x - sum(sent) / K
    return x


def alg3_by_hand(
    compress: Compress, lrs: list[float], detach: float = 0.0
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Algorithm 3 (docs/algorithms.md 2.7), with the gradient taken at ``x_k = w - detach lr e_k``
    (detach 0: the paper's Algorithm 3): p_k = e_k + g_k(x_k) + wd x_k; e_k = p_k - C(p_k);
    m = beta m + mean_k C(p_k); w -= lr m. Returns w, the residuals and m."""
    w = W0.clone()
    m = torch.zeros(D, dtype=torch.float64)
    e = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            x = w - detach * lr * e[k]
            p = e[k] + GRAD(k, x, t) + WD * x
            c = compress(p, DENSITY)[0]
            e[k] = p - c
            sent.append(c)
        m = BETA * m + sum(sent) / K
        w = w - lr * m
    return w, e, m


def alg4_by_hand(compress: Compress, lrs: list[float]) -> torch.Tensor:
    """Algorithm 4 (docs/algorithms.md 2.8): u' = e' + lr g + beta (w_{t-1} - w_t); w -= mean C(u')."""
    w_prev, w = W0.clone(), W0.clone()
    e = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    for t, lr in enumerate(lrs):
        sent = []
        for k in range(K):
            u = e[k] + lr * (GRAD(k, w, t) + WD * w) + BETA * (w_prev - w)
            c = compress(u, DENSITY)[0]
            e[k] = u - c
            sent.append(c)
        w_prev, w = w, w - sum(sent) / K
    return w


def gmc_by_hand(compress: Compress, lrs: list[float]) -> torch.Tensor:
    """GMC, "prev" (algorithms.md 2.2): u = e + g + beta (w_{t-1} - w_t) / lr_{t-1}; w -= lr mean C(u)."""
    w_prev, w = W0.clone(), W0.clone()
    e = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    for t, lr in enumerate(lrs):
        prev_lr = lrs[t - 1] if t > 0 else lr
        sent = []
        for k in range(K):
            u = e[k] + GRAD(k, w, t) + WD * w + BETA * (w_prev - w) / prev_lr
            c = compress(u, DENSITY)[0]
            e[k] = u - c
            sent.append(c)
        w_prev, w = w, w - lr * sum(sent) / K
    return w


def torch_sgd(lrs: list[float], momentum: float, clip: float | None = None) -> torch.Tensor:
    """``torch.optim.SGD`` on the mean of the workers' gradients (optionally each clipped per parameter
    with ``clip_grad_norm_``), i.e. DDP + SGD."""
    w = W0.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=lrs[0], momentum=momentum, weight_decay=WD)
    for t, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        grads = []
        for k in range(K):
            g = GRAD(k, w.detach(), t)
            if clip is not None:
                parts = []
                for offset, n in _segments():
                    holder = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
                    holder.grad = g[offset : offset + n].clone()
                    torch.nn.utils.clip_grad_norm_([holder], clip)
                    parts.append(holder.grad)
                g = torch.cat(parts)
            grads.append(g)
        w.grad = sum(grads) / K
        optimizer.step()
    return w.detach()


# ------------------------------------------------------------------------------- simulator
def simulate(
    method: str,
    compressor: str | None,
    lrs: list[float],
    density: float = DENSITY,
    epochs: list[int] | None = None,
    **options: object,
) -> tuple[list[torch.Tensor], Simulator]:
    """Run the simulator; returns every worker's model (identical for one-model methods)."""
    sim = Simulator(
        {name: torch.zeros(shape) for name, shape in SHAPES.items()},
        num_workers=K,
        method=method,
        compressor=compressor,
        density=density,
        momentum=BETA,
        weight_decay=WD,
        **options,
    )
    per_worker = sim.method.evaluation_point == "mean_params"  # CSER: each worker its own model
    xs = [W0.clone() for _ in range(K)]
    for t, lr in enumerate(lrs):
        if epochs is not None:
            sim.method.on_epoch_start(epochs[t])
        if per_worker:
            points = [_split(x) for x in xs]
        else:
            points = sim.gradient_points(_split(xs[0]), lr)
        grads = [_split(GRAD(k, _flat(points[k]), t)) for k in range(K)]
        directions = sim.step(grads, points, lr)
        if not per_worker:
            for other in directions[1:]:
                for name in SHAPES:
                    assert torch.equal(other[name], directions[0][name])  # one global model
        # the optimizer's momentum-free step, in fp32 like torch.optim.SGD on fp32 parameters
        xs = [
            torch.cat([(_split(xs[k])[n] - lr * directions[k][n]).reshape(-1) for n in SHAPES]).double()
            for k in range(K)
        ]
    return xs, sim


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
