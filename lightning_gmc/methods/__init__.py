"""Layer 2: per-worker error-feedback and momentum state machines (GMC, GMC+, EF and baselines)."""

from lightning_gmc.methods.appendix_a import EFServerMomentum, GMCLRInside
from lightning_gmc.methods.base import (
    BucketState,
    BucketStep,
    GroupHyper,
    Message,
    Method,
    ParameterTable,
    StepSnapshot,
    SupportAgreement,
    Term,
    Undelivered,
    WorkerState,
)
from lightning_gmc.methods.cser import CSER
from lightning_gmc.methods.def_a import DEFA, DEFEvaluation
from lightning_gmc.methods.dense import DMSGD
from lightning_gmc.methods.dgc import DGC, PAPER_SPARSITY_WARMUP
from lightning_gmc.methods.ef import ErrorFeedback
from lightning_gmc.methods.ef21 import EF21
from lightning_gmc.methods.gmc import GMC, MomentumConvention
from lightning_gmc.methods.registry import METHODS, build_method, method_option_names, register_method

register_method(GMC)
# Error feedback under the user's own optimizer (Adam, AdamW, ...).
register_method(ErrorFeedback)
register_method(EF21)  # EF21 (Richtarik et al., 2021): compressed gradient differences
# Baselines of the GMC paper (§5).
register_method(DMSGD)
register_method(DGC)
register_method(CSER)
register_method(DEFA)
register_method(EFServerMomentum)
register_method(GMCLRInside)

__all__ = [
    "CSER",
    "DEFA",
    "DGC",
    "EF21",
    "DMSGD",
    "GMC",
    "METHODS",
    "PAPER_SPARSITY_WARMUP",
    "DEFEvaluation",
    "EFServerMomentum",
    "ErrorFeedback",
    "GMCLRInside",
    "BucketState",
    "BucketStep",
    "GroupHyper",
    "Message",
    "Method",
    "MomentumConvention",
    "ParameterTable",
    "StepSnapshot",
    "SupportAgreement",
    "Undelivered",
    "Term",
    "WorkerState",
    "build_method",
    "method_option_names",
    "register_method",
]
