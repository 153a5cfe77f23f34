"""The cost model's arithmetic and the decision of density="auto", against hand-computed cases.

A synthetic profile with round numbers makes every prediction computable by hand; the arithmetic is
written out next to each assertion.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from lightning_gmc.plan import (
    Arm,
    Cluster,
    DeviceProfile,
    Option,
    arm_traffic,
    choose_density,
    comm_seconds,
    crossover_bps,
    density_grid,
    load_profile,
    plan,
    predict,
    worth_a_trial,
)
from lightning_gmc.plan.profile import compressor_ns, pipeline_seconds, shipped_profiles

PROFILE = DeviceProfile(
    name="test",
    device="cpu",
    measured=False,
    source="round numbers for hand arithmetic",
    pass_ns=1.0,
    optimizer_momentum_ns=2.0,
    bf16_hook_ns=3.0,
    methods_ns={"gmc": 10.0, "gmc+": 12.0, "ef": 4.0, "dmsgd": 2.0},
    compressors_ns={"topk": {"0.001": 20.0, "0.1": 40.0}, "rbgs": {"0.01": 5.0}, "none": {"1": 0.0}},
    decode_ns_per_nnz={"topk": 10.0, "rbgs": 10.0, "none": 0.0},
    collective_latency_s=1e-4,
)
N = 1_000_000
# two nodes of one rank, 100 Mbit/s, no framing loss, 0 hop latency: K = 2
LINK = Cluster(nodes=2, ranks_per_node=1, inter_bps=1e8, inter_latency_s=0.0, efficiency=1.0)


def test_ddp_step_by_hand() -> None:
    # ring all-reduce at K = 2: 2 * 1/2 * 4 MB = 4e6 B = 3.2e7 bit -> 0.32 s, + 1 collective * 100 us
    p = predict(Arm("ddp"), [N], LINK, compute_s=0.05, profile=PROFILE)
    assert p.pipeline_s == 0.0
    assert p.comm_s == pytest.approx(0.32 + 1e-4)
    assert p.step_s == pytest.approx(0.05 + 0.32 + 1e-4)
    # half the line rate carries payload: the bytes take twice as long, the latency stays
    half = predict(Arm("ddp"), [N], replace(LINK, efficiency=0.5), compute_s=0.05, profile=PROFILE)
    assert half.comm_s == pytest.approx(0.64 + 1e-4)
    # 20 us per hop: an all-reduce at K = 2 crosses 2 * log2(2) = 2 hops
    hops = predict(Arm("ddp"), [N], replace(LINK, inter_latency_s=2e-5), compute_s=0.05, profile=PROFILE)
    assert hops.comm_s == pytest.approx(0.32 + 1e-4 + 2 * 2e-5)


def test_compressed_step_by_hand() -> None:
    # GMC top-k 1 %: k = 10,000; all-gather at K = 2 of 10,000 * (4 + 4) B -> 80,000 B = 6.4e5 bit
    # -> 6.4 ms + 100 us. Pipeline: topk at 1 % is log-interpolated between 0.1 % (20) and 10 % (40):
    # 30 ns; (gmc 10 + 30) ns * 1e6 = 40 ms; decode of K-1 = 1 more payload: 10 ns * 10,000 = 0.1 ms;
    # minus the optimizer's momentum step, 2 ns * 1e6 = 2 ms -> 38.1 ms.
    assert compressor_ns(PROFILE, "topk", 0.01) == pytest.approx(30.0)
    p = predict(Arm("gmc", "topk", 0.01), [N], LINK, compute_s=0.05, profile=PROFILE)
    assert p.traffic.bytes_sent == 80_000
    assert p.comm_s == pytest.approx(6.4e-3 + 1e-4)
    assert p.pipeline_s == pytest.approx(0.040 + 0.0001 - 0.002)
    assert p.step_s == pytest.approx(0.05 + 0.0381 + 0.0065)


def test_fixed_costs_per_bucket_by_hand() -> None:
    # 50 us of the hook and 20 us of top-k per bucket, 3 buckets: 3 * 70 us = 0.21 ms on top of the
    # per-element pipeline of test_compressed_step_by_hand (38.1 ms); DDP pays none of it
    fixed = replace(PROFILE, bucket_overhead_s=5e-5, compressor_overhead_s={"topk": 2e-5})
    buckets = [[0], [1], [2]]
    numels = [N // 2, N // 4, N // 4]
    p = predict(Arm("gmc", "topk", 0.01), numels, LINK, compute_s=0.05, profile=fixed, buckets=buckets)
    assert p.traffic.buckets == 3
    assert p.pipeline_s == pytest.approx(0.040 + 0.0001 - 0.002 + 3 * 7e-5)
    dense = predict(Arm("gmc"), numels, LINK, compute_s=0.05, profile=fixed, buckets=buckets)
    assert dense.pipeline_s == pytest.approx(
        predict(Arm("gmc"), numels, LINK, 0.05, PROFILE, buckets).pipeline_s + 1.5e-4
    )
    assert predict(Arm("ddp"), numels, LINK, 0.05, fixed, buckets).pipeline_s == 0.0


def test_overlap_hides_communication_under_compute() -> None:
    # DDP: comm 320.1 ms, half of the 50 ms compute hides 25 ms of it
    p = predict(Arm("ddp"), [N], LINK, compute_s=0.05, profile=PROFILE, overlap=0.5)
    assert p.step_s == pytest.approx(0.05 + 0.3201 - 0.025)
    small = predict(Arm("gmc", "rbgs", 0.01), [N], LINK, compute_s=0.05, profile=PROFILE, overlap=0.5)
    assert small.step_s == pytest.approx(0.05 + small.pipeline_s)  # its 3.3 ms of comm hide entirely


def test_crossover_by_hand() -> None:
    # GMC+ rbgs 1 %: 10,000 values all-reduced at K = 2: 40,000 B; pipeline (12 + 5 - 2) ns * 1e6 = 15 ms.
    # DDP: 4e6 B. Equal steps where 15 ms = (4e6 - 4e4) * 8 / B -> B = 3.168e7 / 0.015 = 2.112 Gbit/s.
    arm = predict(Arm("gmc", "rbgs", 0.01, detach=0.5), [N], LINK, 0.05, PROFILE)
    ddp = predict(Arm("ddp"), [N], LINK, 0.05, PROFILE)
    assert arm.pipeline_s == pytest.approx(0.015)
    assert crossover_bps(arm, ddp, LINK, PROFILE) == pytest.approx(3.168e7 / 0.015, rel=1e-6)


def test_crossover_never_and_always() -> None:
    ddp = predict(Arm("ddp"), [N], LINK, 0.05, PROFILE)
    # the bf16 hook halves the bytes and costs 3 ms: it pays below 2e6 * 8 / 3e-3 = 5.33 Gbit/s
    bf16 = predict(Arm("ddp_bf16"), [N], LINK, 0.05, PROFILE)
    assert crossover_bps(bf16, ddp, LINK, PROFILE) == pytest.approx(1.6e7 / 3e-3, rel=1e-6)
    # dense through the hook: the same bytes as DDP, costs 2 - 2 = 0 ns: ties at every rate -> never faster
    dense = predict(Arm("dmsgd", "none"), [N], LINK, 0.05, PROFILE)
    assert crossover_bps(dense, ddp, LINK, PROFILE) == 0.0
    cheaper = DeviceProfile(**{**PROFILE.__dict__, "methods_ns": {**PROFILE.methods_ns, "gmc": -100.0}})
    free = predict(Arm("gmc", "rbgs", 0.01), [N], LINK, 0.05, cheaper)
    assert crossover_bps(free, ddp, LINK, cheaper) == math.inf


def test_plan_sorts_fastest_first_and_includes_ddp() -> None:
    arms = [Arm("gmc", "topk", 0.01), Arm("gmc", "rbgs", 0.01, detach=0.5)]
    out = plan([N], LINK, 0.05, PROFILE, arms)
    assert [p.arm.method for p in out].count("ddp") == 1
    assert [p.step_s for p in out] == sorted(p.step_s for p in out)
    assert out[-1].arm.method == "ddp"  # 370 ms against ~65-95 ms at 100 Mbit/s


def test_node_hierarchy_pipeline_runs_on_the_shard() -> None:
    # 2 x 2: rbgs 1 % on a shard of 500,000 per rank: (10 + 5) ns * 5e5 = 7.5 ms, + pack/unpack and
    # the division by G: 1 ns * (2e6 + 5e5) = 2.5 ms, - momentum 2 ns * 1e6 = 2 ms -> 8 ms
    cluster = Cluster(nodes=2, ranks_per_node=2, inter_bps=1e8, intra_bps=1e11, efficiency=1.0)
    arm = Arm("gmc", "rbgs", 0.01, hierarchy="node")
    traffic = arm_traffic(arm, [N], nodes=2, ranks_per_node=2)
    assert pipeline_seconds(PROFILE, arm, traffic, ranks_per_node=2) == pytest.approx(0.008)
    # intra: reduce-scatter of 5e5 + all-gather of 5e5 + 1 (the status) fp32, 1 * 4 * (1e6 + 1) B at
    # 100 Gbit/s = 0.32 ms, 2 collectives of 100 us + 1 hop of 2 us; inter: the node's 2 shards,
    # 10,000 values all-reduced at K = 2: 2 * 20,000 B at 100 Mbit/s = 3.2 ms, 1 collective of 100 us
    # + 2 hops of 20 us (the two shards' exchanges run side by side)
    expected = 8 * 4 * 1_000_001 / 1e11 + 2 * (1e-4 + 2e-6) + 3.2e-3 + (1e-4 + 2 * 2e-5)
    assert comm_seconds(traffic, cluster, PROFILE) == pytest.approx(expected)


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profiles_have_every_default_arm(name: str) -> None:
    profile = load_profile(name)
    for method in ("gmc", "gmc+", "ef", "dmsgd"):
        assert method in profile.methods_ns
    for compressor in ("none", "topk", "topk_approx", "topk_shared", "rbgs"):
        assert compressor in profile.compressors_ns and compressor in profile.decode_ns_per_nnz
    assert profile.measured == (profile.device == "cpu")
    if not profile.measured:
        assert profile.source.startswith("NOT MEASURED")


def test_unknown_profile_names_the_shipped_ones() -> None:
    with pytest.raises(ValueError, match="cpu"):
        load_profile("tpu-v9")


# ----------------------------------------------------------------------- the decision of density="auto"
def test_density_grid() -> None:
    assert density_grid(0.01, 0.1) == [0.01, 0.02, 0.05, 0.1]
    assert density_grid(0.003, 0.03) == [0.003, 0.005, 0.01, 0.02, 0.03]


def _options(*rows: tuple[float | None, float, float]) -> list[Option]:
    return [Option(density, step, comm) for density, step, comm in rows]


def test_decision_fastest_then_densest_within_slack() -> None:
    # steps (ms): dense 370, 1 % 60, 2 % 62, 5 % 75. Fastest 60; slack 5 % -> <= 63: {1 %, 2 %} -> 2 %.
    options = _options((None, 0.370, 0.320), (0.01, 0.060, 0.004), (0.02, 0.062, 0.007), (0.05, 0.075, 0.016))
    choice = choose_density(options, compute_s=0.05, slack=0.05)
    assert choice.option.density == 0.02 and "densest" in choice.reason


def test_decision_falls_back_to_dense_when_compression_does_not_pay() -> None:
    # fast link: dense 55 ms, 1 % 90 ms: dense is fastest and densest
    options = _options((None, 0.055, 0.004), (0.01, 0.090, 0.0002))
    assert choose_density(options, compute_s=0.05).option.density is None
    # a near tie goes to dense too: 1 % at 54 ms vs dense 56 ms (within 5 %: 54 * 1.05 = 56.7)
    options = _options((None, 0.056, 0.006), (0.01, 0.054, 0.0002))
    assert choose_density(options, compute_s=0.05).option.density is None


def test_decision_hysteresis_keeps_the_current_setting() -> None:
    # the rule picks 2 % at 60 ms (densest within 5 %); current 1 % at 65 ms <= 1.1 * 60 = 66 -> kept
    options = _options((None, 0.370, 0.32), (0.01, 0.065, 0.004), (0.02, 0.060, 0.007))
    kept = choose_density(options, 0.05, slack=0.05, hysteresis=0.1, current=options[1])
    assert kept.option is options[1] and "kept" in kept.reason
    # at 67 ms it is outside the band (67 > 66): switch to 2 %
    options = _options((None, 0.370, 0.32), (0.01, 0.067, 0.004), (0.02, 0.060, 0.007))
    moved = choose_density(options, 0.05, slack=0.05, hysteresis=0.1, current=options[1])
    assert moved.option.density == 0.02
    # without hysteresis a current setting that is not the pick never stays, however close:
    # dense 143.8 us is the pick, 1 % at 145.3 us is within slack but not the densest
    options = _options((None, 143.8e-6, 1e-4), (0.01, 145.3e-6, 1e-4))
    assert choose_density(options, 1e-4, hysteresis=0.0, current=options[1]).option.density is None


def test_decision_with_a_communication_budget() -> None:
    # compute 100 ms, comm_fraction 0.1 -> budget 10 ms: 1 % (4 ms) and 2 % (8 ms) fit, 5 % (20 ms) not
    options = _options((None, 0.5, 0.4), (0.01, 0.11, 0.004), (0.02, 0.112, 0.008), (0.05, 0.13, 0.020))
    assert choose_density(options, 0.1, comm_fraction=0.1).option.density == 0.02
    # budget 1 ms fits none: the fastest (1 %)
    assert choose_density(options, 0.1, comm_fraction=0.01).option.density == 0.01
    # hysteresis: current 2 % at 10.5 ms <= 1.1 * 10 ms, and no denser option is <= 0.9 * 10 ms -> kept
    options = _options((None, 0.5, 0.4), (0.01, 0.11, 0.004), (0.02, 0.112, 0.0105), (0.05, 0.13, 0.020))
    assert choose_density(options, 0.1, comm_fraction=0.1, current=options[2]).option is options[2]
    # current 1 % while 2 % now needs 8.5 ms <= 9 ms: move up to 2 %
    options = _options((None, 0.5, 0.4), (0.01, 0.11, 0.004), (0.02, 0.112, 0.0085))
    assert choose_density(options, 0.1, comm_fraction=0.1, current=options[1]).option.density == 0.02


def test_decision_needs_options() -> None:
    with pytest.raises(ValueError):
        choose_density([], 0.1)


def test_worth_a_trial_by_hand() -> None:
    measured = Option(0.01, 0.100, 0.01)  # the kept setting, measured: 100 ms
    dense, two, five = Option(None, 0.115, 0.05), Option(0.02, 0.110, 0.02), Option(0.05, 0.125, 0.03)
    options = [dense, measured, two, five]
    # within 20 % (<= 120 ms), unmeasured: 2 % (110 ms) and dense (115 ms); the fastest is 2 %
    assert worth_a_trial(options, measured, {0.01}, margin=0.2) == two
    # 2 % measured already: dense is next; five (125 ms) is never close enough
    assert worth_a_trial(options, measured, {0.01, 0.02}, margin=0.2) == dense
    assert worth_a_trial(options, measured, {0.01, 0.02, None}, margin=0.2) is None
    assert worth_a_trial(options, measured, {0.01}, margin=0.0) is None  # exploring switched off
    assert worth_a_trial(options, two, {0.01}, margin=0.2) is None  # the rule's pick is a prediction
    tie = Option(None, 0.110, 0.05)
    assert worth_a_trial([tie, measured, two], measured, {0.01}, margin=0.2) == tie  # densest on a tie
