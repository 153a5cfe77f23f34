"""The planner's bytes are the bytes the exchange counts: every route, against the simulator.

The planner (``lightning_gmc.plan.traffic``) never runs a compression: it plans each bucket and applies
the transport's byte formulas. The simulator runs the real methods, compressors and exchange over K
in-process workers and counts every collective in ``CommStats``. Each case below is one route.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gmc import HierarchicalSimulator, Simulator
from lightning_gmc.compressors import build_compressor, segments_from_numels
from lightning_gmc.plan import Arm, arm_traffic, ddp_buckets
from lightning_gmc.transport import (
    choose_route,
    ordered_sum_chunk,
    residual_gather_bytes,
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
    # summed in rank order: fp32 sparse values with K >= 3, 16-bit values (laid out by owner) always
    "allreduce rbgs, K = 3 in rank order": (Arm("gmc", "rbgs", 0.05), 3, "allreduce"),
    "allreduce randk bf16 in rank order": (Arm("gmc", "randk", 0.05, wire_dtype="bf16"), 3, "allreduce"),
    "allreduce none fp16 in rank order": (Arm("gmc", "none", wire_dtype="fp16"), 2, "allreduce"),
    "dense fallback topk bf16 in rank order": (Arm("gmc", "topk", 0.5, wire_dtype="bf16"), 4, "dense"),
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
    # Support: 68 int32 broadcast, (K-1)/K * 272 B. Values: a sparse support's fp32 values with K >= 3
    # are summed in rank order, 68 cut into 3 chunks of 23 (69 with one zero of padding): a
    # reduce-scatter of 276 B and an all-gather of 92 B, on the wire 2 (K-1)/K * 276 B.
    planned = arm_traffic(Arm("gmc", "topk_shared", 0.05), NUMELS, nodes=3)
    assert planned.nnz == 68
    assert planned.bytes_sent == pytest.approx(2 / 3 * 272 + 2 * 2 / 3 * 276)
    assert planned.collectives == {"allreduce": 0, "reduce_scatter": 1, "allgather": 1, "broadcast": 1}
    # With K = 2 one all-reduce of the 68 values (a ring of two adds in rank order anyway).
    two = arm_traffic(Arm("gmc", "topk_shared", 0.05), NUMELS, nodes=2)
    assert two.bytes_sent == pytest.approx(1 / 2 * 272 + 2 * 1 / 2 * 272)
    assert two.collectives == {"allreduce": 1, "reduce_scatter": 0, "allgather": 0, "broadcast": 1}


def test_ordered_sum_chunk_by_hand() -> None:
    # fp32: contiguous chunks, ceil(n / K).
    assert ordered_sum_chunk(68, 3) == 23
    assert ordered_sum_chunk(69, 3) == 23
    # 16-bit: element j of parameter p belongs to worker (p + j) mod K. Parameter 0 with 4 elements:
    # workers 0, 1, 2, 0; parameter 1 with 2 elements: workers 1, 2 -> shares 2, 2, 2.
    assert ordered_sum_chunk(6, 3, [(0, 4), (1, 2)]) == 2
    # Parameter 0 with 4 and parameter 3 with 1 (worker 0): shares 3, 1, 1.
    assert ordered_sum_chunk(5, 3, [(0, 4), (3, 1)]) == 3
    assert ordered_sum_chunk(0, 3, []) == 1


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


def test_intra_node_formulas_by_hand() -> None:
    # G = 4 ranks, chunk S = 1000 fp32: reduce-scatter 3 * 1000 * 4 B, all-gather of 1001 (the status
    # element) 3 * 1001 * 4 B -> 12,000 + 12,012; bf16 buckets half of that; one rank sends nothing.
    assert two_level_intra_bytes(1000, 4) == 24_012
    assert two_level_intra_bytes(1000, 4, element_size=2) == 12_006
    assert two_level_intra_bytes(1000, 1) == 0
    # equal shards (G S = n): the ring all-reduce of the bucket plus the G-1 statuses
    assert two_level_intra_bytes(1000, 4) == ring_allreduce_bytes(4 * 4000, 4) + 3 * 4
    # the residual: fp32 whatever the bucket's dtype, once per step, 3 * 1000 * 4 B
    assert residual_gather_bytes(1000, 4) == 12_000
    assert residual_gather_bytes(1000, 1) == 0


def test_node_hierarchy_traffic_by_hand() -> None:
    # N = 2 nodes x G = 2, min_piece 100: 1000 and 200 are split (>= 200) 500|500 and 100|100, the
    # 30 stays whole on rank 0 (a tie at 600|600): rank 0 owns 500 + 100 + 30, rank 1 500 + 100.
    # RBGS 10 %: rank 0 sends 50 + 10 + 3 = 63 values, rank 1 60, each all-reduced at K = 2:
    # 2 * 1/2 * 4 B * k = 252 and 240 B. One bucket, chunk 630: 1 * 4 * (2 * 630 + 1) = 5044 B.
    arm = Arm("gmc", "rbgs", 0.1, hierarchy="node")
    planned = arm_traffic(arm, (1000, 200, 30), nodes=2, ranks_per_node=2, min_piece=100)
    assert planned.rank_inter_bytes == [252, 240] and planned.inter_node_bytes == 492
    assert planned.intra_bytes == 5044 and planned.intra_collectives == 2
    assert planned.bytes_sent == 492 / 2 + 5044
    assert planned.nnz == 123 and planned.workers == 2
    # Two buckets, (30, 200) then (1000): chunks 30 + 100 = 130 and 500 -> 4 * 261 + 4 * 1001 B; each
    # bucket's two exchanges run side by side, one collective per bucket counts.
    two = arm_traffic(arm, (1000, 200, 30), [[2, 1], [0]], nodes=2, ranks_per_node=2, min_piece=100)
    assert two.intra_bytes == 1044 + 4004 and two.collectives["allreduce"] == 2
    # GMC+ (and DEF-A, whose detach is on by default): the residual's all-gather, the largest share 630
    for method, detach in (("gmc", 0.5), ("def_a", 0.0)):
        detached = Arm(method, "rbgs", 0.1, detach=detach, hierarchy="node")
        plus = arm_traffic(detached, (1000, 200, 30), nodes=2, ranks_per_node=2, min_piece=100)
        assert plus.intra_bytes == 5044 + 1 * 4 * 630 and plus.intra_collectives == 3
    assert not Arm("ef_server_momentum", "topk", 0.1).gathers_residual
    assert Arm("ef_server_momentum", "topk", 0.1, detach=0.5).gathers_residual
    assert Arm("def_a", "topk", 0.1).gathers_residual and not Arm("gmc", "topk", 0.1).gathers_residual


# name: (arm, N, G, buckets). The model splits its large parameters at min_piece 64 (2000 and 600 at
# G = 2 and 4, 200 at G = 2 only) and keeps the small ones whole.
HIER_NUMELS = (2000, 200, 30, 600, 7)
NODE = {"hierarchy": "node"}
TWO_BUCKETS = [[4, 3, 2], [1, 0]]
HIER_CASES = {
    "gmc topk G=2": (Arm("gmc", "topk", 0.05, **NODE), 2, 2, TWO_BUCKETS),
    "gmc topk G=4 one bucket": (Arm("gmc", "topk", 0.05, **NODE), 3, 4, None),
    "gmc+ rbgs G=4 (detach)": (Arm("gmc", "rbgs", 0.05, detach=0.5, **NODE), 2, 4, [[4, 3], [2, 1, 0]]),
    "def_a topk G=2 (detach)": (Arm("def_a", "topk", 0.05, **NODE), 2, 2, TWO_BUCKETS),
    "topk_shared bf16 G=4": (Arm("gmc", "topk_shared", 0.05, wire_dtype="bf16", **NODE), 2, 4, None),
    "qsgd G=2": (Arm("gmc", "qsgd", **NODE), 2, 2, TWO_BUCKETS),
}


@pytest.mark.parametrize("name", list(HIER_CASES))
def test_node_hierarchy_plan_equals_what_the_hierarchical_simulator_counts(name: str) -> None:
    arm, nodes, per_node, buckets = HIER_CASES[name]
    planned = arm_traffic(arm, HIER_NUMELS, buckets, nodes=nodes, ranks_per_node=per_node, min_piece=64)
    params = {f"p{i}": (n,) for i, n in enumerate(HIER_NUMELS)}
    sim = HierarchicalSimulator(
        params,
        nodes=nodes,
        ranks_per_node=per_node,
        method=arm.method,
        compressor=arm.compressor,
        density=arm.density,
        wire_dtype=arm.wire_dtype,  # type: ignore[arg-type]
        min_piece=64,
        buckets=buckets,
        **({"detach": arm.detach} if arm.detach else {}),
    )
    assert sim.plan.split_params and len(sim.plan.split_params) < len(HIER_NUMELS)
    gen = torch.Generator().manual_seed(0)
    w = {name: torch.randn(n, generator=gen) for name, n in zip(params, HIER_NUMELS, strict=True)}
    for _ in range(2):
        points = sim.gradient_points(w, lr=0.1)
        grads = [
            {name: torch.randn(n, generator=gen) for name, n in zip(params, HIER_NUMELS, strict=True)}
            for _ in range(nodes * per_node)
        ]
        sim.step(grads, points, lr=0.1)
        assert sim.take_intra_bytes() == planned.intra_bytes
        stats = sim.inter_stats
        rcc_bits, rcc_dense = sum(s.rcc_bits for s in stats), sum(s.rcc_dense_bits for s in stats)
        assert sum(s.nnz for s in stats) == planned.nnz
        inter = [s.take_step()["bytes_sent"] for s in stats]
        assert inter == pytest.approx(planned.rank_inter_bytes, rel=1e-12)
        assert sum(inter) == pytest.approx(planned.inter_node_bytes, rel=1e-12)
        assert planned.bytes_sent == pytest.approx(sum(inter) / per_node + planned.intra_bytes, rel=1e-12)
        if planned.rcc_exact:
            assert rcc_bits / rcc_dense == pytest.approx(planned.rcc, rel=1e-12)
        else:  # all-gathered sparse supports: the planner counts them as disjoint, an upper bound
            assert rcc_bits / rcc_dense <= planned.rcc + 1e-12


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
