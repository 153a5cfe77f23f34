"""The arms of the non-IID study's suites (``examples/noniid_study.py``): label -> method, compressor and
options, the dense baseline, each suite's reference arm and the ``--quick`` subset."""

from __future__ import annotations

from typing import Any

__all__ = ["DENSE", "QUICK_ARMS", "REFERENCE", "SUITES", "adamw_arms", "suite_arms"]

SUITES = ("topk", "rbgs", "adamw")
DENSE = "DMSGD (dense)"
# The arm each suite's paired column compares with: the paper's method (top-k) and the baseline the
# paper's Tables 3-4 compare GMC+ with (RBGS).
REFERENCE = {"topk": "GMC", "rbgs": "DEF-A (RBGS, c=0.3)", "adamw": "AdamW (dense)"}
QUICK_ARMS = {
    "topk": [DENSE, "GMC", "CSER"],
    "rbgs": ["GMC+ (RBGS, lambda=0.5)", "DEF-A (RBGS, c=0.3)", "GMC+ agg. momentum (RBGS, lambda=0.5)"],
    "adamw": ["AdamW (dense)", "EF + AdamW (top-k)"],
}


def suite_arms(suite: str, density: float) -> dict[str, dict[str, Any]]:
    """The arms of one suite: label -> method, compressor and options (density: ``--density``)."""
    dense = {DENSE: {"method": "dmsgd"}}
    if suite == "topk":
        return {
            **dense,
            "DGC (w/ mfm)": {"method": "dgc", "compressor": "topk", "momentum_masking": True},
            "DGC (w/o mfm)": {"method": "dgc", "compressor": "topk", "momentum_masking": False},
            "CSER": {
                "method": "cser",
                "compressor": "topk",
                "density": density / 2,
                "reset_density": min(1.0, 4 * density),
                "reset_interval": 8,
            },
            "DEF-A (c=0.3)": {"method": "def_a", "compressor": "topk", "detach": 0.3},
            "Alg. 3 (EF + server momentum)": {"method": "ef_server_momentum", "compressor": "topk"},
            "Alg. 4 (LR inside residual)": {"method": "gmc_lr_inside", "compressor": "topk"},
            "GMC": {"method": "gmc", "compressor": "topk"},
            "GMC+ (detach=0.5)": {"method": "gmc", "compressor": "topk", "detach": 0.5},
        }
    if suite == "rbgs":
        arms = dict(dense)
        for lam in (0.0, 0.3, 0.5, 1.0):
            label = "GMC (RBGS, no detach)" if lam == 0 else f"GMC+ (RBGS, lambda={lam:g})"
            arms[label] = {"method": "gmc", "compressor": "rbgs", "detach": lam}
        for c in (0.0, 0.3, 0.5):
            arms[f"DEF-A (RBGS, c={c:g})"] = {"method": "def_a", "compressor": "rbgs", "detach": c}
        for lam in (0.0, 0.3, 0.5, 1.0):
            label = "Alg. 3 (RBGS, no detach)" if lam == 0 else f"GMC+ agg. momentum (RBGS, lambda={lam:g})"
            arms[label] = {"method": "ef_server_momentum", "compressor": "rbgs", "detach": lam}
        return arms
    if suite == "adamw":
        return adamw_arms()
    raise ValueError(f"unknown suite {suite!r}; choose from {[*SUITES, 'all']}")


def adamw_arms() -> dict[str, dict[str, Any]]:
    """The ``adamw`` suite: ``ef`` under AdamW (dense and top-k), and GMC with SGD for reference.

    Arms with an ``"optimizer"`` key run through :func:`run_one_with_optimizer`.
    """
    return {
        DENSE: {"method": "dmsgd"},
        "AdamW (dense)": {"method": "ef", "compressor": "none", "optimizer": "adamw"},
        "EF + AdamW (top-k)": {"method": "ef", "compressor": "topk", "optimizer": "adamw"},
        "EF21 + AdamW (top-k)": {"method": "ef21", "compressor": "topk", "optimizer": "adamw"},
        # The same error feedback under the other arms' SGD: separates the optimizer from the method.
        "EF + SGD momentum (top-k)": {"method": "ef", "compressor": "topk", "optimizer": "sgd"},
        "GMC": {"method": "gmc", "compressor": "topk"},
    }
