"""K virtual workers in one process, running the same method and compressor code as the DDP hook.

For research on one CPU: the caller computes each worker's gradient (at the point
:meth:`Simulator.gradient_points` gives, for GMC+ / DEF-A) and :meth:`Simulator.step` returns the
update direction ``m`` with which the (momentum-free) SGD step ``w <- w - lr * m`` is taken.

Example::

    sim = Simulator({"w": torch.zeros(10)}, num_workers=4, method="gmc", compressor="topk",
                    density=0.1, momentum=0.9)
    w = {"w": torch.zeros(10)}
    for t in range(100):
        points = sim.gradient_points(w, lr=0.1)
        grads = [{"w": grad_fn(k, points[k]["w"])} for k in range(4)]
        direction = sim.step(grads, points, lr=0.1)[0]   # the same on every worker for GMC
        w = {name: w[name] - 0.1 * direction[name] for name in w}

With ``method="ef"`` (error feedback on the gradient, ``docs/algorithms.md`` section 2.10) the
direction is the mean of the workers' compressed gradients, and the caller applies its own optimizer
to it, exactly as the optimizer of a real run steps on the gradient the hook leaves::

    sim = Simulator(dict(model.named_parameters()), num_workers=4, method="ef", compressor="topk")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for t in range(100):
        points = sim.gradient_points(dict(model.named_parameters()), lr=1e-3)
        grads = [{"w": grad_fn(k, points[k]["w"])} for k in range(4)]
        for name, p in model.named_parameters():
            p.grad = sim.step(grads, points, lr=1e-3)[0][name]
        optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gmc.compressors import Compressor, WireDtype
from lightning_gmc.config import GMCConfig, check_momentum
from lightning_gmc.methods import (
    BucketStep,
    GroupHyper,
    Message,
    Method,
    ParameterTable,
    StepSnapshot,
    WorkerState,
)
from lightning_gmc.transport import (
    CommStats,
    Exchange,
    InProcessCollectives,
    LeaderSupport,
    WireOverflow,
    leader_of,
)

__all__ = ["Simulator"]


class Simulator:
    """Simulate K workers of a method.

    Args:
        params: parameter names and tensors (only shapes, dtype-independent) or shapes, in the order
            that defines the global parameter order (use ``model.named_parameters()`` order to match a
            real run).
        num_workers: K.
        method: a method name (``"gmc"``, ...; an unknown name raises, listing the valid ones) or a
            :class:`Method` instance.
        compressor: a compressor name or instance (ignored when ``method`` is an instance); None takes
            the method's default (``"topk"``; ``"none"`` for ``"dmsgd"``).
        density: compressor density.
        momentum: ``beta`` (None: 0.9). Methods that leave the optimizer in charge (``ef``) refuse it:
            the caller's optimizer has its own.
        weight_decay: coupled L2 coefficient the method applies; must stay 0 for ``ef``, whose
            caller's optimizer applies weight decay.
        seed: seed of the shared and per-rank random streams (equal to the strategy's ``seed`` to
            reproduce a real run).
        ef_scaling: scale unbiased compressors by ``1/(1+omega)`` (None: for error-feedback methods), as
            :class:`~lightning_gmc.GMCStrategy` does.
        wire_dtype: dtype the compressed values travel in (``"fp32"``, ``"bf16"``, ``"fp16"``), as
            :class:`~lightning_gmc.GMCStrategy`'s option.
        method_options: passed to the method (e.g. ``detach=0.5``).

    Names and options are validated by :class:`~lightning_gmc.config.GMCConfig`, as for the strategy.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor | torch.Size | Sequence[int]],
        num_workers: int,
        method: str | Method = "gmc",
        compressor: str | Compressor | None = None,
        density: float = 0.01,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        seed: int = 0,
        ef_scaling: bool | None = None,
        wire_dtype: WireDtype = "fp32",
        **method_options: Any,
    ) -> None:
        if isinstance(method, Method):
            self.method = method
        else:
            config = GMCConfig(
                method=method,
                compressor=compressor,
                density=density,
                momentum=momentum,
                seed=seed,
                method_options=method_options,
                ef_scaling=ef_scaling,
                wire_dtype=wire_dtype,
            )
            if config.auto is not None:
                raise ValueError(
                    "the simulator runs a fixed density (density='auto' times a real run's steps and link); "
                    "give a number, or replace sim.method.compressor between steps to change it"
                )
            self.method = config.build()
        names = tuple(params)
        shapes = tuple(torch.Size(v.shape if isinstance(v, Tensor) else v) for v in params.values())
        self.table = ParameterTable(names, shapes, tuple(0 for _ in names))
        self.num_workers = num_workers
        if self.method.takes_over_optimizer:
            self.momentum = check_momentum(0.9 if momentum is None else momentum)
            self.weight_decay = float(weight_decay)
        else:
            if momentum is not None or weight_decay != 0.0:
                raise ValueError(
                    f"method {self.method.name!r} leaves momentum and weight decay to the optimizer the "
                    f"caller applies to the returned direction; configure them there and leave the "
                    f"simulator's `momentum` unset and `weight_decay` at 0"
                )
            self.momentum = 0.0
            self.weight_decay = 0.0
        self.stats = CommStats()
        self.exchange = Exchange(InProcessCollectives(num_workers), self.stats)
        self.support = LeaderSupport(self.exchange.collectives, self.stats)
        self.workers = self._build_workers(seed)
        self.step_index = 0
        # fp16 wire: a step whose sum overflows is refused with every buffer and counter as before it
        self._snapshot = StepSnapshot() if self.method.sends_fp16() else None
        self._prev_lr: float | None = None
        self._key = tuple(range(len(names)))

    def _build_workers(self, seed: int) -> list[WorkerState]:
        device = torch.device("cpu")
        return [WorkerState(self.method, self.table, device, rank, seed) for rank in range(self.num_workers)]

    def _residuals(self, worker: int) -> list[Tensor]:
        """Worker ``worker``'s full residual per parameter (flat fp32)."""
        return self.workers[worker].tensors["residual"]

    def worker_state(self, worker: int) -> dict[str, dict[str, Tensor]]:
        """Worker ``worker``'s buffers by name and parameter (what a gathered checkpoint keeps of it)."""
        return self.workers[worker].state_dict()

    def load_worker_state(self, worker: int, state: dict[str, dict[str, Tensor]]) -> None:
        """Give worker ``worker`` the buffers of :meth:`worker_state` (of this or another simulator)."""
        self.workers[worker].load_state_dict(state)

    def continue_from(self, other: Simulator) -> None:
        """Take over ``other``'s step, learning-rate history and every worker's buffers: a resume,
        e.g. of a flat run's K workers as K nodes (:class:`~lightning_gmc.HierarchicalSimulator`)."""
        if other.num_workers != self.num_workers:
            raise ValueError(f"{other.num_workers} workers cannot continue as {self.num_workers}")
        for worker in range(self.num_workers):
            self.load_worker_state(worker, other.worker_state(worker))
        self.step_index, self._prev_lr = other.step_index, other._prev_lr

    def _hyper(self, lr: float) -> GroupHyper:
        prev = self._prev_lr if self._prev_lr is not None else lr
        return GroupHyper(float(lr), float(prev), self.momentum, self.weight_decay)

    def gradient_points(self, params: Mapping[str, Tensor], lr: float) -> list[dict[str, Tensor]]:
        """Where each worker evaluates its gradient this step: ``w - s * residual_k`` (``s`` from the
        method, 0 for GMC)."""
        scale = self.method.detach_scale(self._hyper(lr))
        points = []
        for worker in range(self.num_workers):
            residuals = self._residuals(worker) if scale else []
            point = {}
            for index, name in enumerate(self.table.names):
                w = params[name].detach().to(torch.float32)
                if scale:
                    # The same operation as the hook's detached point (one fused add), so a real
                    # run and the simulator evaluate gradients at the same bits.
                    point[name] = torch.add(w, residuals[index].view_as(w), alpha=-scale)
                else:
                    point[name] = w.clone()
            points.append(point)
        return points

    def _flat(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[name].detach().reshape(-1).to(torch.float32) for name in self.table.names])

    def step(
        self,
        grads: Sequence[Mapping[str, Tensor]],
        points: Sequence[Mapping[str, Tensor]],
        lr: float,
    ) -> list[dict[str, Tensor]]:
        """Run one step of every worker and return each worker's update direction per parameter.

        For methods with a single global model (GMC, DGC, ...) every worker's direction is the same
        tensor values; methods with per-worker models (CSER) return different ones. Methods that take
        over the optimizer return ``m`` for the momentum-free step ``w <- w - lr * m``; ``ef`` returns
        the aggregated gradient, which the caller hands to its own optimizer.

        Args:
            grads: per worker, the gradient of its local loss at ``points[k]``.
            points: per worker, the parameter values its gradient was evaluated at (for weight decay;
                what :meth:`gradient_points` returned).
            lr: this step's learning rate.

        Raises:
            WireOverflow: with ``wire_dtype="fp16"``, a value or a sum over workers beyond +-65504;
                the step is refused, every worker's state and the traffic counters as before it.
        """
        if len(grads) != self.num_workers or len(points) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} gradients and points")
        hyper = self._hyper(lr)
        counters = self.stats.snapshot() if self._snapshot is not None else None
        steps: list[BucketStep | None] = [None] * self.num_workers
        messages: list[list[Message]] = [[] for _ in range(self.num_workers)]
        for rank in self._encode_order():
            worker, grad, point = self.workers[rank], grads[rank], points[rank]
            bucket = worker.bucket(self._key)
            if self._snapshot is not None:
                self._snapshot.keep(self.step_index, bucket)
            flat_grad = self._flat(grad)
            flat_point = self._flat(point)
            step = BucketStep(
                bucket=bucket,
                grad=flat_grad,
                out=flat_grad,
                hypers=[hyper],
                step=self.step_index,
                rng=worker.rng,
                world_size=self.num_workers,
                read_params=_copier(flat_point),
                agree_support=self.support.bind(self.step_index, rank),
            )
            messages[rank] = self.method.encode(step)
            steps[rank] = step
        done = [step for step in steps if step is not None]
        buckets = [step.bucket for step in done]
        # The same exchange as the DDP hook's; each worker decodes from its own copy of the means.
        try:
            means = self.exchange.start(messages, buckets, self.step_index).wait()
        except WireOverflow:
            if self._snapshot is not None and counters is not None:
                self._snapshot.restore()
                self.stats.restore(counters)
            raise
        for step, sent, own in zip(done, messages, means, strict=True):
            self.method.complete(step, sent, own)
        self._prev_lr = float(lr)
        self.step_index += 1
        return [self._unflatten(step.direction()) for step in done]

    def _encode_order(self) -> list[int]:
        """Workers in rank order, except that a ``topk_shared`` step's leader encodes first: the
        others compress on the support it chooses (what its broadcast gives them in a real run)."""
        ranks = list(range(self.num_workers))
        if not any(c.leader_support for c in self.method.compressors()):
            return ranks
        leader = leader_of(self.step_index, self.num_workers)
        return ranks[leader:] + ranks[:leader]

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        result = {}
        offset = 0
        for name, shape in zip(self.table.names, self.table.shapes, strict=True):
            n = shape.numel()
            result[name] = flat[offset : offset + n].view(shape).clone()
            offset += n
        return result

    def evaluation_params(self, params: Sequence[Mapping[str, Tensor]], lr: float) -> dict[str, Tensor]:
        """The model to evaluate, from every worker's parameters (as the strategy's evaluation point).

        ``"params"`` methods (GMC, DGC, ...) evaluate worker 0's parameters (all are equal);
        ``"mean_params"`` (CSER) their average; ``"params_minus_mean_residual"`` (DEF-A's option)
        ``w - (1/K) sum_k s * residual_k``.
        """
        point = self.method.evaluation_point
        names = self.table.names
        if point == "params":
            return {name: params[0][name].detach().clone() for name in names}
        if point == "mean_params":
            return {name: _mean([p[name].detach() for p in params]) for name in names}
        scale = self.method.evaluation_residual_scale(self._hyper(lr))
        residuals = [self._residuals(worker) for worker in range(self.num_workers)]
        out = {}
        for index, name in enumerate(names):
            w = params[0][name].detach()
            mean_residual = _mean([residual[index] for residual in residuals])
            out[name] = w - scale * mean_residual.view_as(w)
        return out

    def residual(self, worker: int) -> dict[str, Tensor]:
        """Worker ``worker``'s residual per parameter (methods with error feedback)."""
        return self.worker_state(worker).get("residual", {})


def _mean(tensors: Sequence[Tensor]) -> Tensor:
    """Sum in worker order, then divide (the order the real run's reduction is compared against)."""
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total / len(tensors)


def _copier(source: Tensor) -> Callable[[Tensor], None]:
    def read(out: Tensor) -> None:
        out.copy_(source)

    return read
