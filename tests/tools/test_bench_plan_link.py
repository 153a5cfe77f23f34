"""The planner's link benchmark without root: its arms map onto the planner's, the MLP's tensors are
the ones link_node.py trains, and every arm gets a prediction (benchmarks/link/bench_plan_link.py; the
measurement itself is a benchmark, not a test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "link"))

import bench_plan_link  # noqa: E402
from link_node import ARMS, make_mlp  # noqa: E402

from lightning_gmc.plan import Arm, load_profile  # noqa: E402


def test_every_link_arm_is_a_planner_arm() -> None:
    assert bench_plan_link.planner_arm("ddp", 0.01) == Arm("ddp")
    assert bench_plan_link.planner_arm("ddp_bf16", 0.01) == Arm("ddp_bf16")
    assert bench_plan_link.planner_arm("gmc_plus_rbgs", 0.01) == Arm("gmc", "rbgs", 0.01, 0.5)
    assert bench_plan_link.planner_arm("gmc_topk_approx_10", 0.01) == Arm("gmc", "topk_approx", 0.1)
    assert bench_plan_link.planner_arm("ef_topk_approx", 0.01) == Arm("ef", "topk_approx", 0.01)
    for arm in ARMS:
        if not arm.endswith("_auto"):
            bench_plan_link.planner_arm(arm, 0.01).build_compressor()


def test_the_mlp_tensors_and_a_prediction_per_arm() -> None:
    dims = [64, 1024, 960, 10]
    assert bench_plan_link.mlp_numels(dims) == [p.numel() for p in make_mlp(dims).parameters()]
    args = bench_plan_link.parse_args([])
    arms = [a for a in args.arms if not a.endswith("_auto")]
    predicted = bench_plan_link.predictions(load_profile("cpu"), 0.03, 1e8, False, 1e-4, arms, args)
    assert set(predicted) == set(arms)
    # at 100 Mbit/s DDP's 4.24 MB take about 355 ms, far more than a compressed step's; two DDP
    # buckets (the first capped at 1 MiB), each a collective of 100 us
    assert predicted["ddp"] == pytest.approx(0.03 + 4_240_680 * 8 / (1e8 * 1448 / 1514) + 2e-4, rel=1e-6)
    assert all(predicted[a] < predicted["ddp"] for a in arms if a != "ddp")


def test_auto_arms_are_timed_after_their_decision_and_against_their_own_compressor() -> None:
    # a trial decided after step 4, the round ended by the decision after step 7: intervals up to 4
    # are the warm-up and the probe, 5-7 the trial, 8 on the setting kept
    history = [{"step": 4, "trial": True}, {"step": 7, "trial": False}]
    records = [
        {
            "arm": "gmc_topk_approx_auto",
            "auto_history": history,
            "step_s": [9, 9, 9, 9, 50, 6, 6, 60, 1, 2, 3],
        },
        {"arm": "gmc_plus_rbgs_auto", "auto_history": history[:1], "step_s": [9, 9, 9, 9, 50, 6, 6]},
        {"arm": "ddp", "auto_history": None, "step_s": [4, 4]},
    ]
    assert bench_plan_link.after_decision(records, "gmc_topk_approx_auto", settled=True) == 2
    # from the first decision on: the median of 6, 6, 60, 1, 2, 3 (trials and later probes included)
    assert bench_plan_link.after_decision(records, "gmc_topk_approx_auto", settled=False) == 4.5
    # a run whose round did not end counts only from its first decision on
    assert bench_plan_link.after_decision(records, "gmc_plus_rbgs_auto", settled=True) is None
    assert bench_plan_link.after_decision(records, "gmc_plus_rbgs_auto", settled=False) == 6
    assert bench_plan_link.after_decision(records, "ef_topk_approx", settled=False) is None
    assert bench_plan_link.same_compressor("gmc_topk_approx_10", "gmc_topk_approx_auto")
    assert bench_plan_link.same_compressor("ddp", "gmc_plus_rbgs_auto")
    assert not bench_plan_link.same_compressor("gmc_plus_rbgs", "gmc_topk_approx_auto")
