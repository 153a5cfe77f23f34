"""Which settings the planner compares, and the densities ``density="auto"`` chooses among."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_gmc.plan.profile import DeviceProfile, method_key
from lightning_gmc.plan.traffic import Arm

__all__ = ["DEFAULT_COMPRESSORS", "DEFAULT_DENSITIES", "default_arms", "density_grid"]

#: the sparsifiers compared by default (GMC); GMC+ runs RBGS, EF runs topk_approx
DEFAULT_COMPRESSORS = ("topk", "topk_approx", "topk_shared", "rbgs")
DEFAULT_DENSITIES = (0.001, 0.01, 0.1)
_SERIES = (1.0, 2.0, 5.0)


def density_grid(low: float, high: float) -> list[float]:
    """The 1-2-5 series of densities in ``[low, high]``, with both ends: the candidates of
    ``density="auto"`` (e.g. ``[0.01, 0.02, 0.05, 0.1]`` for ``(0.01, 0.1)``)."""
    grid = {low, high}
    decade = 1e-6
    while decade <= 1.0:
        for step in _SERIES:
            value = round(step * decade, 12)
            if low <= value <= high:
                grid.add(value)
        decade *= 10
    return sorted(grid)


def default_arms(
    profile: DeviceProfile,
    nodes: int,
    ranks_per_node: int,
    methods: Sequence[str] = ("gmc", "gmc+", "ef"),
    compressors: Sequence[str] = DEFAULT_COMPRESSORS,
    densities: Sequence[float] = DEFAULT_DENSITIES,
) -> list[Arm]:
    """DDP, DDP with torch's bf16 hook, and each method x compressor x density x hierarchy that makes
    sense and that the profile has costs for: GMC with every compressor, GMC+ (detach 0.5) with RBGS,
    EF with ``topk_approx``; ``hierarchy="node"`` when there are several nodes of several ranks."""
    hierarchies = ["flat", "node"] if nodes > 1 and ranks_per_node > 1 else ["flat"]
    arms = [Arm("ddp"), Arm("ddp_bf16")]
    for hierarchy in hierarchies:
        for method in methods:
            if method == "gmc+":
                pairs = [("gmc", "rbgs", 0.5)]
            elif method == "ef":
                pairs = [("ef", "topk_approx", 0.0)]
            else:
                pairs = [(method, c, 0.0) for c in compressors]
            for name, compressor, detach in pairs:
                if compressor not in compressors and method != "gmc+" and method != "ef":
                    continue
                for density in densities:
                    arm = Arm(name, compressor, density, detach, hierarchy)  # type: ignore[arg-type]
                    if method_key(arm) in profile.methods_ns and compressor in profile.compressors_ns:
                        arms.append(arm)
    return arms
