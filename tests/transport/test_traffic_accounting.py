"""Every traffic metric of an in-process exchange against counts written out by hand.

The simulator runs the same exchange and accounting as the DDP hook over K in-process workers, so
these numbers are what a K-rank run logs. Per worker and per step, with payload ``B`` bytes handed
to the collective (ring model):

* all-gather: ``(K-1) B`` on the wire;
* all-reduce (shared support, or the dense fallback of ``4 d`` bytes): ``2 (K-1)/K * B``;
* broadcast of a leader's ``k`` int32 indices (``topk_shared``): ``(K-1)/K * 4 k``;
* RCC: ``(K * upload bits + download bits) / ((K+1) * 32 d)`` (GMC paper, section 5, eq. (9)).

Model: two parameters of 30 and 10 elements (``d = 40``); top-k at density 0.1 keeps
``floor(0.1 n)`` per parameter, 3 + 1 = 4 coordinates.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lightning_gmc import Simulator
from lightning_gmc.transport import CommStats, Exchange, InProcessCollectives
from lightning_gmc.transport.support import LeaderSupport

D = 40
K_TOPK = 4  # 3 of the 30-element parameter + 1 of the 10-element one
SHAPES = {"a": (30,), "b": (5, 2)}


def _grads(workers: int, step: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 * step + 7)
    return [
        {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()} for _ in range(workers)
    ]


def _run(sim: Simulator, steps: int) -> list[dict[str, float]]:
    params = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    taken = []
    for t in range(steps):
        grads = _grads(sim.num_workers, t)
        sim.step(grads, sim.gradient_points(params, 0.1), 0.1)
        taken.append(sim.stats.take_step())
    return taken


def _topk_union(workers: int) -> int:
    """Coordinates in the union of the workers' first-step top-k supports (GMC's first message is
    the gradient itself, scaled: the same support)."""
    union: set[int] = set()
    for grad in _grads(workers, 0):
        union |= {int(i) for i in torch.topk(grad["a"].abs(), 3).indices}
        union |= {30 + int(i) for i in torch.topk(grad["b"].reshape(-1).abs(), 1).indices}
    return len(union)


def _ring(nbytes: float, workers: int) -> float:
    return 2.0 * (workers - 1) / workers * nbytes


# (simulator arguments, K, per step: (bytes handed, wire bytes, upload bits per worker, collectives,
#  nnz per worker)). Each is written out from the compressor's wire format.
Expected = tuple[float, float, float, int, int]
CASES: dict[str, tuple[dict[str, object], int, Callable[[int], Expected]]] = {
    # top-k: 4 fp32 values + 4 int32 indices = 32 bytes, all-gathered.
    "topk_allgather": ({"compressor": "topk", "density": 0.1}, 3, lambda t: (32, 2 * 32, 256, 1, 4)),
    # RBGS: one shared block per parameter; 4 fp32 values all-reduced (the offsets are drawn, not sent).
    # With K = 3 they are summed in rank order (docs/algorithms.md 3.10): the 4 values padded to 3
    # chunks of 2 (24 bytes) go to a reduce-scatter, one chunk (8 bytes) to an all-gather.
    "rbgs_allreduce": (
        {"compressor": "rbgs", "density": 0.1},
        3,
        lambda t: (24 + 8, _ring(24, 3), 128, 2, 4),
    ),
    # top-k at density 0.9 (27 + 9 = 36 coordinates, 288 bytes): an all-gather would send 2 * 288 bytes,
    # more than a ring all-reduce of the 160-byte dense bucket, so the dense vector is all-reduced.
    "topk_dense_fallback": (
        {"compressor": "topk", "density": 0.9},
        3,
        lambda t: (4 * D, _ring(4 * D, 3), 8 * 288, 1, 36),
    ),
    # Natural compression: 9 bits per element packed into ceil(360 / 8) = 45 bytes, all-gathered.
    "natural_allgather": ({"compressor": "natural"}, 2, lambda t: (45, 45, 360, 1, D)),
    # Natural compression with 8 workers: an all-gather of 7 * 45 bytes would exceed a ring all-reduce
    # of the 160-byte bucket (280 bytes), so the decoded vectors are all-reduced densely.
    "natural_dense_fallback": ({"compressor": "natural"}, 8, lambda t: (4 * D, _ring(4 * D, 8), 360, 1, D)),
    # Dense momentum SGD: the fp32 bucket, all-reduced.
    "dense": ({"method": "dmsgd", "compressor": "none"}, 4, lambda t: (4 * D, _ring(4 * D, 4), 32 * D, 1, D)),
    # One worker: nothing crosses a link, but RCC still counts the message.
    "one_worker": ({"compressor": "topk", "density": 0.1}, 1, lambda t: (0, 0, 256, 0, 4)),
    # CSER, H = 2: C1 (top-k, 32 bytes) every step, plus C2 at density min(1, 2 * 0.1) = 0.2
    # (6 + 2 = 8 coordinates, 64 bytes) on reset steps: steps count from 1, so step indices 1, 3, ...
    "cser_reset_steps": (
        {"method": "cser", "compressor": "topk", "density": 0.1, "reset_interval": 2},
        2,
        lambda t: (32 + 64, 32 + 64, 768, 2, 12) if t % 2 == 1 else (32, 32, 256, 1, 4),
    ),
    # topk_shared alone: its own top-k, nothing broadcast or reduced; RCC counts the 4 values.
    "topk_shared_one_worker": ({"compressor": "topk_shared", "density": 0.1}, 1, lambda t: (0, 0, 128, 0, 4)),
    # topk_shared: the leader broadcasts 4 int32 indices,
    "topk_shared": (
        {"compressor": "topk_shared", "density": 0.1},
        4,
        # then the 4 fp32 values in rank order: a reduce-scatter (4 chunks of 1), an all-gather of one
        lambda t: (16 + 16 + 4, 3 / 4 * 16 + _ring(16, 4), 128, 3, 4),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bytes_collectives_and_density_per_step_and_in_total(case: str) -> None:
    options, workers, expected = CASES[case]
    taken = _run(Simulator(dict(SHAPES), workers, **options), 3)  # type: ignore[arg-type]
    wire_total = 0.0
    dense_per_step = _ring(4 * D, workers) if workers > 1 else 0.0
    for t, metrics in enumerate(taken):
        handed, wire, _, collectives, nnz = expected(t)
        wire_total += wire
        assert metrics["bytes_to_collectives"] == handed, t
        assert metrics["bytes_sent"] == pytest.approx(wire, rel=1e-12, abs=0), t
        assert metrics["collectives"] == collectives, t
        assert metrics["density"] == pytest.approx(nnz / D, rel=1e-12), t
        assert metrics["dense_bytes"] == pytest.approx(dense_per_step, rel=1e-12, abs=0), t
        assert metrics["dense_bytes_total"] == pytest.approx((t + 1) * dense_per_step, rel=1e-12, abs=0)
        assert metrics["bytes_sent_total"] == pytest.approx(wire_total, rel=1e-12, abs=0), t


@pytest.mark.parametrize(
    ("case", "download_bits"),
    [
        ("topk_allgather", lambda: 64 * _topk_union(3)),  # value + index per coordinate of the union
        ("one_worker", lambda: 64 * K_TOPK),
        ("rbgs_allreduce", lambda: 32 * K_TOPK),  # the shared block: values only
        ("natural_allgather", lambda: 32 * D),  # the aggregate of quantized vectors is dense fp32
        ("natural_dense_fallback", lambda: 32 * D),
        ("dense", lambda: 32 * D),
        # the leader's indices go up and come down once (2 * 128 bits), the summed values down
        ("topk_shared", lambda: 2 * 128 + 32 * K_TOPK),
    ],
)
def test_first_step_rcc_is_the_paper_ratio(case: str, download_bits: Callable[[], int]) -> None:
    options, workers, expected = CASES[case]
    first = _run(Simulator(dict(SHAPES), workers, **options), 1)[0]  # type: ignore[arg-type]
    upload_bits = expected(0)[2]
    rcc = (workers * upload_bits + download_bits()) / ((workers + 1) * 32 * D)
    assert first["rcc_step"] == pytest.approx(rcc, rel=1e-12)
    assert first["rcc"] == pytest.approx(rcc, rel=1e-12)


def test_dense_fallback_download_counts_the_nonzeros_of_the_mean() -> None:
    options, workers, _ = CASES["topk_dense_fallback"]
    sim = Simulator(dict(SHAPES), workers, **options)  # type: ignore[arg-type]
    params = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    directions = sim.step(_grads(workers, 0), sim.gradient_points(params, 0.1), 0.1)
    # First GMC step: the direction is the mean of the decoded messages, zero off the union.
    union = sum(int(torch.count_nonzero(directions[0][name])) for name in SHAPES)
    assert 36 <= union <= D
    rcc = (workers * 8 * 288 + 64 * union) / ((workers + 1) * 32 * D)
    assert sim.stats.take_step()["rcc_step"] == pytest.approx(rcc, rel=1e-12)


def test_cumulative_rcc_is_the_ratio_of_sums_and_survives_a_state_round_trip() -> None:
    options, workers, _ = CASES["cser_reset_steps"]
    sim = Simulator(dict(SHAPES), workers, **options)  # type: ignore[arg-type]
    taken = _run(sim, 3)
    denominator = (workers + 1) * 32 * D
    numerators = [m["rcc_step"] * denominator for m in taken]
    assert taken[-1]["rcc"] == pytest.approx(sum(numerators) / (3 * denominator), rel=1e-12)
    # A checkpoint keeps the run totals; a fresh counter restored from it continues them.
    restored = CommStats()
    restored.load_state_dict(sim.stats.state_dict())
    assert restored.state_dict() == sim.stats.state_dict()
    restored.record_bucket(D, workers, 4, step=3)
    restored.record_message("allgather", workers, 32, 4, 256.0, step=3)
    restored.record_broadcast(lambda: 512.0, step=3)
    step = restored.take_step()
    assert step["bytes_sent"] == 32
    assert step["bytes_sent_total"] == pytest.approx(taken[-1]["bytes_sent_total"] + 32, rel=1e-12)
    assert step["dense_bytes_total"] == pytest.approx(4 * _ring(4 * D, workers), rel=1e-12)
    assert step["rcc"] == pytest.approx((sum(numerators) + 2 * 256 + 512) / (4 * denominator), rel=1e-12)


def test_skipped_buckets_are_counted_in_the_state() -> None:
    stats = CommStats()
    stats.nonfinite_skips = 2
    restored = CommStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.take_step()["nonfinite_skips"] == 2


@pytest.mark.parametrize("case", list(CASES))
def test_deferred_accounting_equals_eager_accounting_on_every_taken_step(case: str) -> None:
    # The DDP hook defers RCC's download count to the steps whose metrics are taken; taken every
    # step, it must report what the simulator's eager accounting reports.
    options, workers, _ = CASES[case]
    eager = Simulator(dict(SHAPES), workers, **options)  # type: ignore[arg-type]
    deferred = Simulator(dict(SHAPES), workers, **options)  # type: ignore[arg-type]
    deferred.stats = CommStats(defer_rcc=True)
    deferred.exchange = Exchange(InProcessCollectives(workers), deferred.stats)
    deferred.support = LeaderSupport(deferred.exchange.collectives, deferred.stats)
    for eager_step, deferred_step in zip(_run(eager, 3), _run(deferred, 3), strict=True):
        assert deferred_step == pytest.approx(eager_step, rel=1e-12)
        assert deferred_step["rcc_step"] > 0


def test_a_step_of_several_buckets_and_supports_adds_them_up() -> None:
    # The DDP hook records every bucket of a step (the simulator has one): counts add up per step.
    stats = CommStats()
    for numel in (30, 10):
        stats.record_bucket(numel, 4, 4, step=0)
        stats.record_support(4 * 2, 4, step=0)  # 2 int32 leader indices
        stats.record_message("allreduce", 4, 4 * 2, 2, 64.0, step=0)
    taken = stats.take_step()
    assert taken["dense_bytes"] == pytest.approx(_ring(4 * 40, 4), rel=1e-12)
    assert taken["density"] == pytest.approx(4 / 40, rel=1e-12)
    assert taken["collectives"] == 4 and taken["bytes_to_collectives"] == 4 * 8
    assert taken["bytes_sent"] == pytest.approx(2 * (3 / 4 * 8 + _ring(8, 4)), rel=1e-12)
    # RCC: the indices up and down (2 * 64 bits each), the values up from 4 workers; no download here
    assert taken["rcc_step"] == pytest.approx(2 * (2 * 64 + 4 * 64) / (5 * 32 * 40), rel=1e-12)


def test_a_step_without_traffic_reports_zeros() -> None:
    taken = CommStats().take_step()
    assert taken["density"] == taken["rcc"] == taken["rcc_step"] == taken["bytes_sent"] == 0.0
