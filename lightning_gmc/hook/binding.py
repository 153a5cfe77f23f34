"""The optimizer binding: which parameters the hook serves, and the per-step hyper-parameters.

GMC applies momentum and coupled weight decay inside the method (``docs/algorithms.md`` sections 2.2
and 3.4), so :meth:`OptimizerBinding.attach` records each param group's ``momentum`` and
``weight_decay`` and sets them to zero in the optimizer, whose step is then plain SGD with the
scheduled learning rate. The user's values still travel in ``optimizer.state_dict()`` (a state-dict
hook writes them back into the saved param groups), so a checkpoint resumed under plain DDP continues
with the user's momentum and weight decay; loading a state dict re-applies the takeover.

A method with ``takes_over_optimizer = False`` (``ef``, ``docs/algorithms.md`` section 2.10) accepts
any ``torch.optim.Optimizer`` and changes nothing in it: the optimizer applies its own momentum,
weight decay and adaptive scaling to the aggregated gradient, and the method sees zeros for both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_gmc.config import check_momentum
from lightning_gmc.methods import GroupHyper, Method, ParameterTable

__all__ = ["OptimizerBinding", "StepClock"]

log = logging.getLogger(__name__)


class OptimizerBinding:
    """The model's trainable parameters, their optimizer, and the hyper-parameters the method applies.

    Args:
        method: the method; ``takes_over_optimizer`` decides whether the optimizer must be SGD and
            has its momentum and weight decay moved into the method.
        momentum: overrides every param group's ``momentum`` when not None.
    """

    def __init__(self, method: Method, momentum: float | None = None) -> None:
        self.method = method
        self.momentum_override = None if momentum is None else check_momentum(momentum)
        self.optimizer: torch.optim.Optimizer | None = None
        self.table = ParameterTable((), (), ())
        self.params: list[nn.Parameter] = []
        self._index: dict[torch.Tensor, int] = {}
        #: per param group: the values the method applies, and the user's values as configured.
        self.group_momentum: list[float] = []
        self.group_weight_decay: list[float] = []
        self.user_groups: list[dict[str, float]] = []

    @property
    def takes_over(self) -> bool:
        return self.method.takes_over_optimizer

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Bind to the model's trainable parameters and (for methods that do) take over momentum and
        weight decay.

        Raises:
            TypeError: the method takes over the optimizer and it is not ``torch.optim.SGD``.
            ValueError: unsupported SGD options, sparse gradients, or trainable parameters that are
                not in the optimizer.
        """
        if self.takes_over:
            _check_sgd(self.method, optimizer)
        _check_no_sparse_gradients(model)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        group_of = {p: index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [name for name, p in named if p not in group_of]
        if missing:
            raise ValueError(
                f"trainable parameters {missing[:5]} are not in the optimizer; pass them to it or "
                f"freeze them with requires_grad_(False)"
            )
        self.table = ParameterTable(
            names=tuple(name for name, _ in named),
            shapes=tuple(p.shape for _, p in named),
            groups=tuple(group_of[p] for _, p in named),
        )
        self.params = [p for _, p in named]
        self._index = {p: i for i, p in enumerate(self.params)}
        self.optimizer = optimizer
        self._record_groups(optimizer)
        if self.takes_over:
            self.release_optimizer_hyperparameters()
            optimizer.register_state_dict_post_hook(self._save_user_groups)
            optimizer.register_load_state_dict_post_hook(self._retake_after_load)

    def _record_groups(self, optimizer: torch.optim.Optimizer) -> None:
        self.user_groups = [
            {"momentum": float(g.get("momentum", 0.0)), "weight_decay": float(g.get("weight_decay", 0.0))}
            for g in optimizer.param_groups
        ]
        if not self.takes_over:  # the optimizer applies them itself
            self.group_momentum = [0.0] * len(self.user_groups)
            self.group_weight_decay = [0.0] * len(self.user_groups)
            return
        override = self.momentum_override
        self.group_momentum = [
            check_momentum(g["momentum"] if override is None else override) for g in self.user_groups
        ]
        self.group_weight_decay = [g["weight_decay"] for g in self.user_groups]

    def release_optimizer_hyperparameters(self) -> None:
        """Zero the optimizer's momentum and weight decay (the method applies them). Loading an
        optimizer state dict calls this by itself."""
        if self.optimizer is None or not self.takes_over:
            return
        for group in self.optimizer.param_groups:
            group["momentum"] = 0.0
            group["weight_decay"] = 0.0

    def _save_user_groups(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        # The saved groups are copies (Optimizer.state_dict packs new dicts), so the live optimizer
        # keeps its released values.
        for saved, user in zip(state["param_groups"], self.user_groups, strict=True):
            saved.update(user)
        return state

    def _retake_after_load(self, optimizer: torch.optim.Optimizer) -> None:
        self.release_optimizer_hyperparameters()

    def check_released(self) -> None:
        """Raise if something set the optimizer's momentum or weight decay again after the takeover."""
        if self.optimizer is None or not self.takes_over:
            return
        for index, group in enumerate(self.optimizer.param_groups):
            if group.get("momentum", 0.0) != 0.0 or group.get("weight_decay", 0.0) != 0.0:
                raise RuntimeError(
                    f"param group {index} has momentum={group.get('momentum')} weight_decay="
                    f"{group.get('weight_decay')} but lightning_gmc applies both itself; something (a "
                    f"scheduler cycling momentum, a loaded optimizer state) set them again. Call "
                    f"release_optimizer_hyperparameters() after changing the optimizer."
                )

    def hypers(self, prev_lrs: list[float] | None) -> list[GroupHyper]:
        """Per-group hyper-parameters with the learning rates the optimizer holds now."""
        if self.optimizer is None:
            raise RuntimeError("GMCHookState.attach(model, optimizer) must be called before training")
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        prev = prev_lrs if prev_lrs is not None else lrs
        return [
            GroupHyper(lr, prev_lr, beta, wd)
            for lr, prev_lr, beta, wd in zip(
                lrs, prev, self.group_momentum, self.group_weight_decay, strict=True
            )
        ]

    def training_parameters(self, values: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The training parameters by name (CPU copies), for checkpoints of methods whose evaluation
        model differs from them; ``values`` replaces the live parameters (e.g. a swap's backup)."""
        tensors = [p.detach() for p in self.params] if values is None else values
        return {name: t.cpu().clone() for name, t in zip(self.table.names, tensors, strict=True)}

    def load_training_parameters(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Copy parameters saved by :meth:`training_parameters` back into the model."""
        with torch.no_grad():
            for name, p in zip(self.table.names, self.params, strict=True):
                p.copy_(saved[name])

    def parameter_indices(self, params: list[torch.Tensor]) -> tuple[int, ...]:
        """Global indices of the parameters of one DDP bucket."""
        try:
            return tuple(self._index[p] for p in params)
        except KeyError as err:
            raise RuntimeError(
                "DDP handed the hook a parameter that was not attached; call state.attach(model, "
                "optimizer) with the module DDP wraps"
            ) from err


class StepClock:
    """Optimizer-step counter and learning-rate history.

    DDP calls the hook once per bucket; the first bucket of a step fixes that step's hyper-parameters
    (:meth:`begin_step`, idempotent within a step) and the last one advances the clock
    (:meth:`end_step`), recording the step's learning rates as the next step's ``prev_lr``.
    """

    def __init__(self, binding: OptimizerBinding) -> None:
        self.binding = binding
        self.step = 0
        self.last_lrs: list[float] | None = None
        self._current: list[GroupHyper] | None = None

    @property
    def in_step(self) -> bool:
        """Whether a step has begun (its first bucket came) and not ended."""
        return self._current is not None

    def peek(self) -> list[GroupHyper]:
        """Hyper-parameters of the step about to run (learning rates read from the optimizer now)."""
        return self.binding.hypers(self.last_lrs)

    def begin_step(self) -> list[GroupHyper]:
        """This step's hyper-parameters, fixed by the first call of the step."""
        if self._current is None:
            self.binding.check_released()
            self._current = self.peek()
        return self._current

    def end_step(self) -> None:
        """Close the step begun by :meth:`begin_step`."""
        if self._current is None:
            raise RuntimeError("end_step() without begin_step()")
        self.last_lrs = [h.lr for h in self._current]
        self._current = None
        self.step += 1

    def abandon_step(self) -> None:
        """Forget the step begun by :meth:`begin_step` without advancing (a refused step): the next
        bucket begins it again, with the hyper-parameters read then."""
        self._current = None

    def load(self, step: int, last_lrs: list[float] | None) -> None:
        self.step = int(step)
        self.last_lrs = None if last_lrs is None else [float(x) for x in last_lrs]


def _check_sgd(method: Method, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(
            f"method {method.name!r} supports torch.optim.SGD (momentum and weight decay per param "
            f"group, any LR scheduler); got {type(optimizer).__name__}. The method implements momentum "
            f"itself, so adaptive optimizers cannot be combined with it: use method='ef' to keep "
            f"Adam/AdamW (error feedback on the gradient, the optimizer stays in charge)."
        )
    for index, group in enumerate(optimizer.param_groups):
        if group.get("nesterov", False) or group.get("dampening", 0) != 0 or group.get("maximize", False):
            raise ValueError(
                f"param group {index}: method {method.name!r} implements heavy-ball momentum; use SGD "
                f"with nesterov=False, dampening=0, maximize=False, or method='ef' to keep these options "
                f"(the optimizer stays in charge)"
            )


def _check_no_sparse_gradients(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
            raise ValueError(
                f"module {name!r} produces sparse gradients (sparse=True), which DDP puts in their own "
                f"bucket outside any comm hook's control; construct it with sparse=False"
            )
