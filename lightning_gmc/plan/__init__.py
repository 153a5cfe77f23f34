"""Will compression pay on a cluster? The cost model, its calibration, and ``density="auto"``'s decision.

``python -m lightning_gmc.plan`` (:mod:`lightning_gmc.plan.cli`) prints, for a model and a cluster,
the predicted step time, bytes per rank and RCC of DDP, DDP with torch's bf16 hook and each method x
compressor x density x hierarchy, fastest first, with the link rate below which each arm beats DDP.
:func:`plan` is the same as a function. ``docs/planner.md`` describes and validates the model.

Parts (this package imports layers 1-3 only, so the hook can use it):

* :mod:`~lightning_gmc.plan.traffic`: bytes and collectives per step, from the compressors' plans and
  the transport's byte formulas;
* :mod:`~lightning_gmc.plan.profile`: per-element costs of a device (measured, or derived);
* :mod:`~lightning_gmc.plan.cost`: the step-time model and crossover rates;
* :mod:`~lightning_gmc.plan.decide`: the choice of ``density="auto"``;
* :mod:`~lightning_gmc.plan.calibrate`: ``--calibrate``, timing this device.
"""

from lightning_gmc.plan.arms import default_arms, density_grid
from lightning_gmc.plan.cost import Cluster, Prediction, comm_seconds, crossover_bps, plan, predict
from lightning_gmc.plan.decide import Choice, Option, choose_density, worth_a_trial
from lightning_gmc.plan.profile import DeviceProfile, load_profile, pipeline_seconds
from lightning_gmc.plan.traffic import Arm, Traffic, arm_traffic, ddp_buckets

__all__ = [
    "Arm",
    "Choice",
    "Cluster",
    "DeviceProfile",
    "Option",
    "Prediction",
    "Traffic",
    "arm_traffic",
    "choose_density",
    "worth_a_trial",
    "comm_seconds",
    "crossover_bps",
    "ddp_buckets",
    "default_arms",
    "density_grid",
    "load_profile",
    "main",
    "pipeline_seconds",
    "plan",
    "predict",
]


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m lightning_gmc.plan``, ``lightning-gmc plan``)."""
    from lightning_gmc.plan.cli import main as cli_main

    return cli_main(argv)
