"""Layer 2: per-worker error-feedback and momentum state machines (GMC, GMC+ and baselines)."""

from lightning_gmc.methods.base import (
    BucketState,
    BucketStep,
    GroupHyper,
    Message,
    Method,
    ParameterTable,
    WorkerState,
)
from lightning_gmc.methods.gmc import GMC, MomentumConvention
from lightning_gmc.methods.registry import METHODS, build_method, method_option_names, register_method

register_method(GMC)

__all__ = [
    "GMC",
    "METHODS",
    "BucketState",
    "BucketStep",
    "GroupHyper",
    "Message",
    "Method",
    "MomentumConvention",
    "ParameterTable",
    "WorkerState",
    "build_method",
    "method_option_names",
    "register_method",
]
