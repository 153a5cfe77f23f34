"""Layer 4: the DDP communication hook and its per-rank state, usable without Lightning.

Plain DDP (or Fabric, via ``model._forward_module``)::

    import torch, lightning_gmc
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    state = lightning_gmc.GMCHookState(lightning_gmc.build_method("gmc", lightning_gmc.build_compressor(
        "topk", density=0.01)))
    state.attach(model, optimizer)        # takes over momentum and weight decay (see below)
    ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
    for x, y in loader:
        with state.detached_point():      # GMC+ / DEF-A only; a no-op for GMC
            loss = loss_fn(ddp(x), y)
            loss.backward()
        optimizer.step(); optimizer.zero_grad()

Tuning guide:

* ``density``: fraction of each parameter sent per step. The GMC paper's top-k runs are consistent
  with 0.25-0.3 %; RBGS with GMC+ tolerates far lower densities than plain error feedback. Top-k via
  all-gather only saves bytes while ``density < 1/K`` (K ranks); past that a bucket automatically
  falls back to a dense all-reduce of the compressed vector (same maths, fewer bytes).
* ``rbgs`` is all-reduce compatible and costs O(k) to select, so it is the compressor that pays off on
  fast links; exact ``topk`` is the accuracy reference and slow on large tensors, ``topk_approx`` is
  the practical top-k.
* Momentum and weight decay move from the optimizer into the method: ``attach`` records each param
  group's ``momentum`` and ``weight_decay`` and sets them to zero in the optimizer, whose step then is
  plain SGD with the scheduled learning rate. Coupled L2 is added to the gradient before compression.

State (residuals, global momentum) is kept in fp32 per parameter, whatever the parameter dtype, and
survives DDP's bucket rebuild after the first iteration.
"""

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.futures import Future

from lightning_gmc.methods import BucketStep, GroupHyper, Method, ParameterTable, WorkerState
from lightning_gmc.transport import CommStats, Exchange, TorchCollectives

__all__ = ["GMCHookState", "NonFinitePolicy", "gmc_hook"]

log = logging.getLogger(__name__)

NonFinitePolicy = Literal["skip", "raise"]

STATE_FORMAT = 1


class GMCHookState:
    """Per-rank state of :func:`gmc_hook`.

    Args:
        method: the method (holds its compressor), e.g. ``build_method("gmc", build_compressor("rbgs"))``.
        process_group: the group DDP reduces in; None means the default group.
        seed: seed of the shared random streams (RBGS blocks, random-k); must be equal on every rank.
        momentum: overrides every param group's ``momentum`` when not None.
        nonfinite: what to do when a rank's gradient for a bucket contains inf/NaN.
            ``"skip"`` (default): that rank contributes a zero gradient for the bucket this step, so
            neither its residual nor the shared momentum is poisoned; no extra synchronisation is
            needed and the event is counted in the ``nonfinite_skips`` metric. ``"raise"``: raise
            :class:`FloatingPointError` (costs a device sync per bucket); the other ranks' collectives
            then fail once that process ends (or at the process group's timeout), so they stop too.
    """

    def __init__(
        self,
        method: Method,
        process_group: dist.ProcessGroup | None = None,
        seed: int = 0,
        momentum: float | None = None,
        nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.method = method
        self.process_group = process_group
        self.seed = int(seed)
        self.momentum_override = momentum
        self.nonfinite: NonFinitePolicy = nonfinite
        # RCC's downlink count runs only for steps whose metrics are taken (take_metrics).
        self.stats = CommStats(defer_rcc=True)
        self.exchange = Exchange(TorchCollectives(process_group), self.stats)
        self.step = 0
        self.hook_calls = 0
        self.worker: WorkerState | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.table: ParameterTable | None = None
        self._params: list[nn.Parameter] = []
        self._index: dict[nn.Parameter, int] = {}
        self._group_momentum: list[float] = []
        self._group_weight_decay: list[float] = []
        self._last_lrs: list[float] | None = None
        self._step_hypers: list[GroupHyper] | None = None
        self._detached_backup: list[Tensor] | None = None
        self._detached_active = False
        self._evaluation_backup: list[Tensor] | None = None
        self._nonfinite_pending: Tensor | None = None

    # ----------------------------------------------------------------------------------- setup
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Bind to the model's trainable parameters and take over the optimizer's momentum and weight
        decay.

        Raises:
            TypeError: the optimizer is not ``torch.optim.SGD``.
            ValueError: unsupported SGD options, sparse gradients, or trainable parameters that are
                not in the optimizer.
        """
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"lightning_gmc supports torch.optim.SGD (momentum and weight decay per param group, any "
                f"LR scheduler); got {type(optimizer).__name__}. The method implements momentum itself, "
                f"so adaptive optimizers cannot be combined with it."
            )
        _check_no_sparse_gradients(model)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        group_of: dict[nn.Parameter, int] = {}
        for group_index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                group_of[p] = group_index
        missing = [name for name, p in named if p not in group_of]
        if missing:
            raise ValueError(
                f"trainable parameters {missing[:5]} are not in the optimizer; pass them to it or "
                f"freeze them with requires_grad_(False)"
            )
        for group_index, group in enumerate(optimizer.param_groups):
            if group.get("nesterov", False) or group.get("dampening", 0) != 0 or group.get("maximize", False):
                raise ValueError(
                    f"param group {group_index}: lightning_gmc implements heavy-ball momentum; use SGD with "
                    f"nesterov=False, dampening=0, maximize=False"
                )
        self.table = ParameterTable(
            names=tuple(name for name, _ in named),
            shapes=tuple(p.shape for _, p in named),
            groups=tuple(group_of[p] for _, p in named),
        )
        self._params = [p for _, p in named]
        self._index = {p: i for i, p in enumerate(self._params)}
        self.optimizer = optimizer
        self._group_momentum = []
        self._group_weight_decay = []
        for group in optimizer.param_groups:
            beta = (
                float(group.get("momentum", 0.0))
                if self.momentum_override is None
                else self.momentum_override
            )
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"momentum must be in [0, 1), got {beta}")
            self._group_momentum.append(beta)
            self._group_weight_decay.append(float(group.get("weight_decay", 0.0)))
        self.release_optimizer_hyperparameters()
        device = self._params[0].device if self._params else torch.device("cpu")
        rank = dist.get_rank(self.process_group) if dist.is_available() and dist.is_initialized() else 0
        self.worker = WorkerState(self.method, self.table, device, rank, self.seed)
        log.info(
            "lightning_gmc: %s on %d parameters (%d elements); momentum=%s weight_decay=%s",
            self.method.describe(),
            len(self.table),
            self.table.numel,
            self._group_momentum,
            self._group_weight_decay,
        )

    def release_optimizer_hyperparameters(self) -> None:
        """Zero the optimizer's momentum and weight decay (the method applies them). Call again after
        loading an optimizer state dict that may carry them."""
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["momentum"] = 0.0
            group["weight_decay"] = 0.0

    # ---------------------------------------------------------------------------- step state
    def current_hypers(self) -> list[GroupHyper]:
        """Hyper-parameters of the step about to run (learning rates read from the optimizer now)."""
        if self.optimizer is None:
            raise RuntimeError("GMCHookState.attach(model, optimizer) must be called before training")
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        prev = self._last_lrs if self._last_lrs is not None else lrs
        return [
            GroupHyper(lr, prev_lr, beta, wd)
            for lr, prev_lr, beta, wd in zip(
                lrs, prev, self._group_momentum, self._group_weight_decay, strict=True
            )
        ]

    def _begin_step(self) -> list[GroupHyper]:
        if self._step_hypers is None:
            assert self.optimizer is not None
            for index, group in enumerate(self.optimizer.param_groups):
                if group.get("momentum", 0.0) != 0.0 or group.get("weight_decay", 0.0) != 0.0:
                    raise RuntimeError(
                        f"param group {index} has momentum={group.get('momentum')} weight_decay="
                        f"{group.get('weight_decay')} but lightning_gmc applies both itself; something (a "
                        f"scheduler cycling momentum, a loaded optimizer state) set them again. Call "
                        f"release_optimizer_hyperparameters() after changing the optimizer."
                    )
            self._step_hypers = self.current_hypers()
        return self._step_hypers

    def _end_step(self) -> None:
        assert self._step_hypers is not None
        self._last_lrs = [h.lr for h in self._step_hypers]
        self._step_hypers = None
        self.step += 1

    # -------------------------------------------------------------------------- detached point
    @contextlib.contextmanager
    def detached_point(self) -> Iterator[None]:
        """Evaluate the gradient at the method's detached point (GMC+, DEF-A) inside this block.

        Parameters are moved to ``w - s * residual`` on entry and restored bit-exactly on exit. Wrap
        the forward *and* backward of every micro-batch of a step.
        """
        self.enter_detached_point()
        try:
            yield
        finally:
            self.exit_detached_point()

    def enter_detached_point(self) -> None:
        """Move parameters to the detached point (no-op when the method has none or already moved)."""
        if self._detached_active or self.worker is None:
            return
        hypers = self.current_hypers()
        scales = [self.method.detach_scale(hypers[g]) for g in self.table.groups]  # type: ignore[union-attr]
        if not any(scales):
            return
        if self._detached_backup is None:
            self._detached_backup = [torch.empty_like(p) for p in self._params]
        residuals = self.worker.tensors["residual"]
        with torch.no_grad():
            for p, backup, residual, scale in zip(
                self._params, self._detached_backup, residuals, scales, strict=True
            ):
                backup.copy_(p)
                if scale:
                    p.add_(residual.view_as(p).to(p.dtype), alpha=-scale)
        self._detached_active = True

    def exit_detached_point(self) -> None:
        """Restore the parameters saved by :meth:`enter_detached_point`."""
        if not self._detached_active:
            return
        assert self._detached_backup is not None
        with torch.no_grad():
            for p, backup in zip(self._params, self._detached_backup, strict=True):
                p.copy_(backup)
        self._detached_active = False

    # ------------------------------------------------------------------------ evaluation point
    @property
    def evaluation_differs(self) -> bool:
        """True when the method evaluates a model other than the training parameters."""
        return self.worker is not None and self.method.evaluation_point != "params"

    def enter_evaluation_point(self) -> None:
        """Swap the parameters for the method's evaluation model (a collective: call on every rank).

        No-op for methods that evaluate the training parameters (GMC, GMC+, DGC, ...).
        """
        if not self.evaluation_differs or self._evaluation_backup is not None:
            return
        world_size = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        hypers = self.current_hypers()
        self._evaluation_backup = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            if self.method.evaluation_point == "mean_params":
                flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in self._params])
            else:  # params_minus_mean_residual
                assert self.worker is not None and self.table is not None
                residuals = self.worker.tensors["residual"]
                flat = torch.cat(
                    [
                        r * self.method.evaluation_residual_scale(hypers[group])
                        for r, group in zip(residuals, self.table.groups, strict=True)
                    ]
                )
            if world_size > 1:
                dist.all_reduce(flat, group=self.process_group)
            flat.div_(world_size)
            offset = 0
            for p in self._params:
                chunk = flat[offset : offset + p.numel()].view_as(p)
                if self.method.evaluation_point == "mean_params":
                    p.copy_(chunk)
                else:
                    p.sub_(chunk.to(p.dtype))
                offset += p.numel()

    def exit_evaluation_point(self) -> None:
        """Restore the training parameters saved by :meth:`enter_evaluation_point`."""
        if self._evaluation_backup is None:
            return
        with torch.no_grad():
            for p, saved in zip(self._params, self._evaluation_backup, strict=True):
                p.copy_(saved)
        self._evaluation_backup = None

    def training_parameters(self) -> dict[str, Tensor]:
        """This rank's training parameters by name (CPU copies), for checkpoints of methods whose
        evaluation model differs from them."""
        assert self.table is not None
        pairs = zip(self.table.names, self._params, strict=True)
        return {name: p.detach().cpu().clone() for name, p in pairs}

    def load_training_parameters(self, saved: dict[str, Tensor]) -> None:
        """Copy parameters saved by :meth:`training_parameters` back into the model."""
        assert self.table is not None
        with torch.no_grad():
            for name, p in zip(self.table.names, self._params, strict=True):
                p.copy_(saved[name])

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: step, learning-rate history, shared and local buffers, traffic totals."""
        if self.worker is None:
            raise RuntimeError("nothing to save before attach()")
        return {
            "format": STATE_FORMAT,
            "method": self.method.describe(),
            "step": self.step,
            "last_lrs": self._last_lrs,
            "shared": self.worker.state_dict("shared"),
            "local": self.worker.state_dict("local"),
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], load_local: bool = True) -> None:
        """Restore :meth:`state_dict` output; ``load_local=False`` keeps zero residuals."""
        if self.worker is None:
            raise RuntimeError("attach() must run before load_state_dict()")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported lightning_gmc state format {state.get('format')!r}")
        if state["method"] != self.method.describe():
            raise ValueError(
                f"checkpoint was written by {state['method']!r}, this run uses {self.method.describe()!r}"
            )
        self.step = int(state["step"])
        self._last_lrs = None if state["last_lrs"] is None else [float(x) for x in state["last_lrs"]]
        self.worker.load_state_dict(state["shared"])
        if load_local:
            self.worker.load_state_dict(state["local"])
        else:
            self.worker.reset("local")
        self.stats.load_state_dict(state["stats"])

    def count_nonfinite(self, skipped: Tensor) -> None:
        """Accumulate skipped-bucket events on the device (read once per step by :meth:`take_metrics`)."""
        pending = skipped.to(torch.int64)
        self._nonfinite_pending = (
            pending if self._nonfinite_pending is None else self._nonfinite_pending + pending
        )

    def take_metrics(self) -> dict[str, float]:
        """This step's traffic metrics plus the residual norm; resets the per-step counters.

        RCC counts the steps whose metrics are taken (the union of sparse supports is only computed
        then); call it every step for the RCC of every step.
        """
        if self._nonfinite_pending is not None:
            self.stats.nonfinite_skips += int(self._nonfinite_pending)
            self._nonfinite_pending = None
        metrics = self.stats.take_step()
        metrics["residual_norm"] = self.residual_norm()
        return metrics

    def residual_norm(self) -> float:
        """L2 norm of this rank's residual (0 for methods without one)."""
        if self.worker is None or "residual" not in self.worker.tensors:
            return 0.0
        return self.worker.squared_norm("residual") ** 0.5

    def parameter_indices(self, params: list[Tensor]) -> tuple[int, ...]:
        try:
            return tuple(self._index[p] for p in params)
        except KeyError as err:
            raise RuntimeError(
                "DDP handed the hook a parameter that was not attached; call state.attach(model, "
                "optimizer) with the module DDP wraps"
            ) from err


def _check_no_sparse_gradients(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
            raise ValueError(
                f"module {name!r} produces sparse gradients (sparse=True), which DDP puts in their own "
                f"bucket outside any comm hook's control; construct it with sparse=False"
            )


def _read_params(params: list[Tensor]) -> Callable[[Tensor], None]:
    def read(out: Tensor) -> None:
        torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params], out=out)

    return read


def gmc_hook(state: GMCHookState, bucket: dist.GradBucket) -> Future[Tensor]:
    """DDP communication hook running ``state.method`` with its compressor on one gradient bucket.

    Issues exactly one collective per message (one per bucket for every method except at CSER-style
    reset steps) in the hook body; only local decoding runs in the future's callback.
    """
    if not isinstance(bucket, dist.GradBucket):
        raise TypeError(
            "gmc_hook received a (grad, param) tuple instead of a GradBucket: compiled autograd's "
            "python_reducer mode is not supported; disable torch._dynamo.config.optimize_ddp or "
            "compiled autograd"
        )
    if state.worker is None:
        raise RuntimeError("GMCHookState.attach(model, optimizer) must be called before the first backward")
    state.hook_calls += 1
    hypers = state._begin_step()
    params = bucket.parameters()
    bucket_state = state.worker.bucket(state.parameter_indices(params))
    buffer = bucket.buffer()
    grad = buffer if buffer.dtype == torch.float32 else buffer.to(torch.float32)
    # One reduction pass: an inf or NaN anywhere makes the min or the max non-finite (NaN propagates
    # through both); isfinite(grad).all() would allocate gradient-sized temporaries.
    low, high = torch.aminmax(grad)
    skipped = torch.isfinite(low).logical_and(torch.isfinite(high)).logical_not()
    if state.nonfinite == "raise":
        if bool(skipped):
            raise FloatingPointError(
                f"non-finite gradient in a bucket of {len(params)} parameters at step {state.step} on rank "
                f"{state.worker.rank}"
            )
    else:
        if grad.device.type == "cpu":
            if bool(skipped):  # no device to keep asynchronous: skip the fill pass when all is finite
                grad.zero_()
        else:
            grad.masked_fill_(skipped, 0.0)  # drops the whole bucket contribution, no host sync
        state.count_nonfinite(skipped)
    world_size = state.exchange.world_size
    step = BucketStep(
        bucket=bucket_state,
        grad=grad,
        out=grad,
        hypers=hypers,
        step=state.step,
        rng=state.worker.rng,
        world_size=world_size,
        read_params=_read_params(params),
    )
    messages = state.method.encode(step)
    future = state.exchange.start(
        [messages], [bucket_state], state.step, bucket.index(), dense_element_size=buffer.element_size()
    )
    if bucket.is_last():
        state._end_step()

    def finish(fut: Future[list[list[Tensor]]]) -> Tensor:
        state.method.decode(step, fut.value()[0])
        if grad is not buffer:
            buffer.copy_(grad)
        return buffer

    return future.then(finish)
