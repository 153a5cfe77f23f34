"""What the Lightning strategy and the Fabric strategy share: argument checks, the run summary line,
the gradient-clipping policy and the names under which metrics are logged."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from lightning_gmc.config import GMCConfig
from lightning_gmc.hook import GMCHookState
from lightning_gmc.hook.metrics import sum_over_ranks
from lightning_gmc.methods import METHODS

__all__ = [
    "CHECKPOINT_KEY",
    "LOGGED_METRICS",
    "PROGRESS_BAR_METRICS",
    "check_no_gradient_clipping",
    "rank_aggregated_metrics",
    "reject_conflicting_ddp_args",
    "run_summary",
]

#: the key of the GMC state (every rank's residuals, the step, the learning-rate history) in a checkpoint
CHECKPOINT_KEY = "lightning_gmc"

#: per-rank metrics logged as ``gmc/<name>`` every step
LOGGED_METRICS = (
    "bytes_sent",
    "bytes_sent_inter",  # hierarchy="node" only (as are the next)
    "bytes_sent_intra",
    "dense_bytes",
    "bytes_sent_total",
    "dense_bytes_total",
    "rcc",
    "density",
    "residual_norm",
)

#: shown in the progress bar unless the strategy's ``progress_bar_metrics=False``
PROGRESS_BAR_METRICS = ("rcc", "bytes_sent")

#: traffic summed over ranks at logging steps, logged as ``gmc/<name>_sum_ranks``
_TRAFFIC_SUMMED_OVER_RANKS = ("bytes_sent", "dense_bytes", "bytes_sent_total", "dense_bytes_total")

# DDP options that would install a second comm hook or bypass ours.
_CONFLICTING_DDP_ARGS = {
    "ddp_comm_hook": "the strategy installs its own DDP communication hook",
    "ddp_comm_state": "the strategy owns the hook state",
    "ddp_comm_wrapper": "wrapping the hook (e.g. fp16_compress_wrapper) would keep residuals in low "
    "precision; the hook already keeps state in fp32",
    "model_averaging_period": "post-local SGD model averaging replaces the gradient all-reduce GMC relies on",
    "mixed_precision": "DDP's native mixed_precision registers its own comm hook; use precision="
    "'bf16-mixed' instead",
}


def reject_conflicting_ddp_args(owner: str, ddp_kwargs: dict[str, Any]) -> None:
    """Remove the DDP arguments LightningCLI passes as None; raise for any that is set."""
    for key, reason in _CONFLICTING_DDP_ARGS.items():
        if ddp_kwargs.pop(key, None) is not None:
            raise ValueError(f"{owner} does not accept `{key}`: {reason}. Remove the argument.")


def run_summary(config: GMCConfig, state: GMCHookState) -> str:
    """One line with the effective configuration (defaults resolved), logged on rank 0 at fit start.

    Every :class:`GMCConfig` field appears, so a registered strategy name or a command-line override
    that replaced a setting shows up in the line.
    """
    method = state.method
    detach = getattr(method, "detach", None)
    binding = state.binding
    effective = {
        "method": config.method_name,
        "compressor": repr(method.compressor),
        "density": config.density,
        "detach": "n/a" if detach is None else detach,
    }
    rest = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name not in effective and field.name != "compressor_options"
    }
    parts = [f"{key}={value}" for key, value in {**effective, **rest}.items()]
    if method.takes_over_optimizer:
        parts.append(f"momentum per group={binding.group_momentum}")
        parts.append(f"weight_decay per group={binding.group_weight_decay}")
    return "lightning_gmc: " + ", ".join(parts)


def check_no_gradient_clipping(state: GMCHookState, what: str) -> None:
    """Reject gradient clipping for methods whose hook writes the update direction into ``.grad``.

    Such a method has already applied momentum, error feedback and weight decay when the optimizer
    (and anything clipping before it) sees ``.grad``, so clipping there bounds the update direction,
    not the gradient, and the method's state never sees the clipped value: the run would differ from
    clipping under DDP without saying so.
    """
    method = state.method
    if not method.takes_over_optimizer:
        return  # the optimizer steps on the averaged gradient: clipping acts as under DDP
    leaves_optimizer = sorted(name for name, cls in METHODS.items() if not cls.takes_over_optimizer)
    alternative = (
        f"a method whose update your own optimizer applies ({', '.join(map(repr, leaves_optimizer))}), "
        "where clipping acts on the averaged gradient as under DDP, or "
        if leaves_optimizer
        else ""
    )
    raise ValueError(
        f"{what} is not supported with method {method.name!r}: its communication hook replaces each "
        "gradient with the method's update direction (momentum, residual and weight decay applied), so "
        "clipping would bound that direction, not the gradient, and the method's state would never see "
        f"the clipped value. Remove the clipping, or use {alternative}DDPStrategy for clipped "
        "training."
    )


def logged_metrics(metrics: Mapping[str, float], names: tuple[str, ...]) -> dict[str, float]:
    """``gmc/<name>`` for the given metric names that are present."""
    return {f"gmc/{name}": float(metrics[name]) for name in names if name in metrics}


def rank_aggregated_metrics(
    metrics: Mapping[str, float], process_group: dist.ProcessGroup | None, device: torch.device
) -> dict[str, float]:
    """Traffic summed over ranks (``gmc/<name>_sum_ranks``) and the skipped non-finite buckets of all
    ranks (``gmc/nonfinite_skips``), from one all-reduce: a collective, call it on every rank at the
    same step."""
    names = (*_TRAFFIC_SUMMED_OVER_RANKS, "nonfinite_skips")
    summed = sum_over_ranks({name: metrics.get(name, 0.0) for name in names}, process_group, device)
    out = {f"gmc/{name}_sum_ranks": summed[name] for name in _TRAFFIC_SUMMED_OVER_RANKS}
    out["gmc/nonfinite_skips"] = summed["nonfinite_skips"]
    return out
