"""The planner's bytes are the bytes the exchange counts: every route, against the simulator.

The planner (``lightning_gmc.plan.traffic``) never runs a compression: it plans each bucket and applies
the transport's byte formulas. The simulator runs the real methods, compressors and exchange over K
in-process workers and counts every collective in ``CommStats``. Each case below is one route.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gmc import Simulator
from lightning_gmc.compressors import build_compressor, segments_from_numels
from lightning_gmc.plan import Arm, arm_traffic, ddp_buckets
from lightning_gmc.transport import (
    choose_route,
    ring_allreduce_bytes,
    two_level_intra_bytes,
    wire_bytes,
)

NUMELS = (300, 50, 1000, 7)  # segments of unequal size: per-segment counts floor differently


def _simulated(arm: Arm, workers: int, steps: int = 2) -> list[dict[str, float]]:
    torch.manual_seed(0)
    params = {f"p{i}": torch.zeros(n) for i, n in enumerate(NUMELS)}
    sim = Simulator(
        params,
        num_workers=workers,
        method=arm.method,
        compressor=arm.compressor,
        density=arm.density,
        wire_dtype=arm.wire_dtype,  # type: ignore[arg-type]
        **({"detach": arm.detach} if arm.detach else {}),
    )
    w = {name: torch.randn(n) for name, n in zip(params, NUMELS, strict=True)}
    metrics = []
    for _ in range(steps):
        points = sim.gradient_points(w, lr=0.1)
        grads = [
            {name: torch.randn(n) for name, n in zip(params, NUMELS, strict=True)} for _ in range(workers)
        ]
        sim.step(grads, points, lr=0.1)
        metrics.append(sim.stats.take_step())
    return metrics


CASES = {
    # name: (arm, K, the route the exchange takes)
    "allgather topk": (Arm("gmc", "topk", 0.05), 4, "allgather"),
    "allgather topk bf16": (Arm("gmc", "topk", 0.05, wire_dtype="bf16"), 3, "allgather"),
    "allgather qsgd": (Arm("gmc", "qsgd"), 3, "allgather"),
    "allreduce rbgs": (Arm("gmc", "rbgs", 0.05, detach=0.5), 4, "allreduce"),
    "allreduce none (dense through the hook)": (Arm("dmsgd", "none"), 4, "allreduce"),
    "dense fallback topk 50%": (Arm("gmc", "topk", 0.5), 4, "dense"),
    "topk_shared support broadcast": (Arm("gmc", "topk_shared", 0.05), 3, "allreduce"),
    "ef topk_approx": (Arm("ef", "topk_approx", 0.05), 2, "allgather"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_planned_bytes_equal_the_exchange_counts(name: str) -> None:
    arm, workers, route = CASES[name]
    planned = arm_traffic(arm, NUMELS, nodes=workers)
    assert planned.routes == [route]
    for measured in _simulated(arm, workers):
        assert measured["bytes_sent"] == pytest.approx(planned.bytes_sent, rel=1e-12)
        assert measured["dense_bytes"] == pytest.approx(planned.dense_bytes, rel=1e-12)
        assert measured["collectives"] == sum(planned.collectives.values())
        assert measured["density"] == pytest.approx(planned.nnz / planned.numel, rel=1e-12)
        if planned.rcc_exact:
            assert measured["rcc_step"] == pytest.approx(planned.rcc, rel=1e-12)
        else:  # all-gathered sparse supports: the planner counts them as disjoint, an upper bound
            assert measured["rcc_step"] <= planned.rcc + 1e-12


def test_topk_shared_counts_the_leader_broadcast_by_hand() -> None:
    # K = 3, density 5 %: k per segment = floor(0.05 n) >= 1 -> 15 + 2 + 50 + 1 = 68 coordinates.
    # Support: 68 int32 broadcast, (K-1)/K * 272 B; values: ring all-reduce of 68 fp32, 2 (K-1)/K * 272 B.
    planned = arm_traffic(Arm("gmc", "topk_shared", 0.05), NUMELS, nodes=3)
    assert planned.nnz == 68
    assert planned.bytes_sent == pytest.approx(2 / 3 * 272 + 2 * 2 / 3 * 272)
    assert planned.collectives == {"allreduce": 1, "allgather": 0, "broadcast": 1}


def test_ddp_baselines_are_a_ring_all_reduce_of_the_gradient() -> None:
    n = sum(NUMELS)
    assert arm_traffic(Arm("ddp"), NUMELS, nodes=4).bytes_sent == ring_allreduce_bytes(4 * n, 4)
    assert arm_traffic(Arm("ddp_bf16"), NUMELS, nodes=4).bytes_sent == ring_allreduce_bytes(2 * n, 4)
    assert arm_traffic(Arm("ddp"), NUMELS, nodes=4).rcc == pytest.approx(1.0)


def test_buckets_add_up_and_follow_ddp() -> None:
    # DDP buckets parameters in reverse order, the first up to 1 MiB: 300k + 200k floats fill 2 MB
    numels = (100, 300_000, 10, 200_000, 5)
    buckets = ddp_buckets(numels, bucket_cap_mb=25)
    assert buckets == [[4, 3, 2, 1], [0]]
    one = arm_traffic(Arm("gmc", "rbgs", 0.01), numels, nodes=2)
    two = arm_traffic(Arm("gmc", "rbgs", 0.01), numels, buckets, nodes=2)
    assert two.bytes_sent == one.bytes_sent  # values all-reduce: per-segment counts, additive
    assert sum(two.collectives.values()) == 2


def test_two_level_intra_bytes_by_hand() -> None:
    # G = 4 ranks, shard of 1000 fp32: reduce-scatter 3 * 1000 * 4 B, all-gather the same; + shift 3 * 4000.
    assert two_level_intra_bytes(1000, 4) == 24_000
    assert two_level_intra_bytes(1000, 4, shift=True) == 36_000
    assert two_level_intra_bytes(1000, 4, element_size=2) == 12_000
    assert two_level_intra_bytes(1000, 1) == 0
    # equal shards: the ring all-reduce's bytes of the whole bucket
    assert two_level_intra_bytes(1000, 4) == ring_allreduce_bytes(4 * 4000, 4)


def test_node_hierarchy_traffic_by_hand() -> None:
    # N = 2 nodes x G = 2: each rank's shard is half of every parameter, K = 2 between nodes.
    arm = Arm("gmc", "rbgs", 0.1, hierarchy="node")
    planned = arm_traffic(arm, (1000, 200), nodes=2, ranks_per_node=2)
    # shard: 500 + 100 elements, k = 50 + 10 = 60 values, ring all-reduce at K = 2: 2 * 1/2 * 240 B
    assert planned.intra_bytes == two_level_intra_bytes(600, 2)
    assert planned.bytes_sent == 240 + two_level_intra_bytes(600, 2)
    assert planned.inter_node_bytes == 2 * 240
    assert planned.nnz == 120 and planned.workers == 2


def test_wire_bytes_is_what_the_stats_count() -> None:
    compressor = build_compressor("topk", density=0.1)
    plan = compressor.plan(segments_from_numels([100]))
    assert choose_route(compressor, plan, 3) == "allgather"
    assert wire_bytes("allgather", plan.payload_nbytes, 3) == 2 * 80
    assert wire_bytes("allreduce", 400, 4) == ring_allreduce_bytes(400, 4) == 600
    assert wire_bytes("local", 400, 1) == 0


def test_planning_a_large_model_allocates_no_workspace() -> None:
    # 7B elements in 300 tensors: plans are tuples of counts, their workspaces stay empty
    numels = (7_000_000_000 // 300,) * 300
    for name in ("topk", "rbgs", "qsgd", "topk_shared"):
        compressor = build_compressor(name, density=0.01)
        plan = compressor.plan(segments_from_numels(numels))
        assert len(plan.workspace) == 0 and plan.workspace.nbytes == 0
