"""The method columns of the generated configs: each one's ``GMCStrategy`` arguments (or plain DDP).

The values and where they come from are listed in ``examples/configs/generate.py``'s header.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RBGS_DENSITY", "RBGS_STUDY_ARMS", "TOPK_DENSITY", "Method", "rbgs_method", "topk_methods"]

TOPK_DENSITY = 0.0025
RBGS_DENSITY = 0.015625


@dataclass(frozen=True)
class Method:
    """One method column: the strategy's ``init_args`` (or a plain DDP baseline)."""

    key: str
    title: str
    init_args: dict[str, object] = field(default_factory=dict)
    ddp: bool = False


def topk_methods(
    density: float, cser_density: float = 0.001, cser_reset_density: float = 0.008
) -> list[Method]:
    """The five columns of Tables 1 and 2 (``density``: top-k density of DGC, DEF-A and GMC)."""
    common = {"compressor": "topk_approx", "density": density}
    # DGC as the GMC paper ran it: no sparsity warm-up, no clipping, weight decay inside the compressed
    # vector like every other method here (the DGC code's local variant is weight_decay_mode: local).
    dgc = {"sparsity_warmup": False, "clip_norm": None, "weight_decay_mode": "compressed"}
    return [
        Method(
            "dgc_mfm",
            "DGC (w/ mfm)",
            {"method": "dgc", **common, "method_options": {"momentum_masking": True, **dgc}},
        ),
        Method(
            "dgc",
            "DGC (w/o mfm)",
            {"method": "dgc", **common, "method_options": {"momentum_masking": False, **dgc}},
        ),
        Method(
            "cser",
            "CSER",
            {
                "method": "cser",
                "compressor": "topk_approx",
                "density": cser_density,
                "method_options": {
                    "reset_compressor": "topk_approx",
                    "reset_density": cser_reset_density,
                    "reset_interval": 8,
                },
            },
        ),
        Method(
            "def_a",
            "DEF-A",
            {
                "method": "def_a",
                **common,
                "detach": 0.3,
                "method_options": {"evaluation": "x_t_minus_mean_error"},
            },
        ),
        Method(
            "gmc",
            "GMC",
            {"method": "gmc", **common, "detach": 0.0, "method_options": {"momentum_lr_convention": "prev"}},
        ),
    ]


RBGS_STUDY_ARMS = (
    ("gmc_plus", (0.0, 0.3, 0.5, 1.0)),
    ("def_a", (0.0, 0.3, 0.5)),
    ("gmc_plus_agg_momentum", (0.0, 0.3, 0.5, 1.0)),
)


def rbgs_method(key: str, coeff: float) -> Method:
    """A Table 3 / Table 4 column (DEF-A or GMC+), or the aggregate-momentum variant, with RBGS and
    detach coefficient ``coeff``."""
    name = {"def_a": "def_a", "gmc_plus": "gmc", "gmc_plus_agg_momentum": "ef_server_momentum"}[key]
    title = {
        "def_a": "DEF-A",
        "gmc_plus": "GMC+",
        "gmc_plus_agg_momentum": "GMC+ with momentum on the aggregate",
    }[key]
    return Method(
        key,
        f"{title} (coefficient {coeff})",
        {"method": name, "compressor": "rbgs", "density": RBGS_DENSITY, "detach": coeff},
    )
