"""topk_shared (ScaleCom's cyclic leader rule) and wire_dtype in the simulator: hand-written
references, exact byte formulas, fp16 overflow. On 2 gloo ranks:
``tests/distributed/test_scaleout_distributed.py``.

References: docs/algorithms.md 3.12 (wire dtype) and 3.13 (topk_shared).
"""

from __future__ import annotations

import pytest
import torch
from reference import TopK, segments

from lightning_gmc import GMCConfig, Simulator
from lightning_gmc.compressors import TopKShared, build_compressor, segments_from_numels

SIZES = {"a": 40, "b": 15}  # k = 4 and 1 at density 0.1
SHAPES = {name: (n,) for name, n in SIZES.items()}


def _grads(gen: torch.Generator, workers: int, scale: float = 1.0) -> list[dict[str, torch.Tensor]]:
    return [
        {name: scale * torch.randn(n, generator=gen) for name, n in SIZES.items()} for _ in range(workers)
    ]


def _run(sim: Simulator, grads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    zeros = {name: torch.zeros(n) for name, n in SIZES.items()}
    return sim.step(grads, [zeros] * sim.num_workers, lr=0.1)[0]


def _topk_support(u: torch.Tensor) -> torch.Tensor:
    """Per-parameter top-k at density 0.1 by hand (k = 4 and 1): the indices kept, ascending."""
    return TopK(0.1).support(u, 0, segments(SIZES.values())).nonzero().squeeze(1)


def test_topk_shared_uses_the_leaders_support_sums_values_and_keeps_the_rest() -> None:
    workers, beta = 3, 0.9
    sim = Simulator(SHAPES, num_workers=workers, compressor="topk_shared", density=0.1, momentum=beta)
    gen = torch.Generator().manual_seed(0)
    d = sum(SIZES.values())
    residual = [torch.zeros(d) for _ in range(workers)]
    momentum = torch.zeros(d)
    for step in range(5):
        grads = _grads(gen, workers)
        direction = _run(sim, grads)
        # u_k = e_k + g_k + beta m_{t-1} (add with alpha, as torch.optim.SGD's momentum rounds it)
        u = [
            (residual[k] + torch.cat(list(grads[k].values()))).add_(momentum, alpha=beta)
            for k in range(workers)
        ]
        support = _topk_support(u[step % workers])  # the leader is step mod K
        total = u[0][support] + u[1][support] + u[2][support]  # summed in rank order
        momentum = torch.zeros(d).index_copy_(0, support, total / workers)
        for k in range(workers):
            residual[k] = u[k].index_fill(0, support, 0.0)
        assert torch.equal(torch.cat([direction["a"], direction["b"]]), momentum), step
        for k in range(workers):
            assert torch.equal(torch.cat(list(sim.residual(k).values())), residual[k]), (step, k)
        # bytes: the leader's k int32 broadcast (k = 5), then the k fp32 values summed in rank order
        # (K = 3): a reduce-scatter of them padded to 3 chunks of 2, an all-gather of one chunk
        metrics = sim.stats.take_step()
        assert metrics["bytes_to_collectives"] == 4 * 5 + 4 * 6 + 4 * 2
        assert metrics["bytes_sent"] == pytest.approx(
            (workers - 1) / workers * 20 + 2 * (workers - 1) / workers * 24
        )
        assert metrics["collectives"] == 3


def test_topk_shared_alone_is_exact_topk_and_rcc_counts_the_indices() -> None:
    x = torch.randn(55, generator=torch.Generator().manual_seed(1))
    segments = segments_from_numels(list(SIZES.values()))
    shared, exact = TopKShared(0.1), build_compressor("topk", density=0.1)
    out_shared, out_exact = torch.zeros(55), torch.zeros(55)
    shared.decompress_add(
        shared.compress(x, shared.plan(segments), None, 0), shared.plan(segments), out_shared
    )  # type: ignore[arg-type]
    exact.decompress_add(exact.compress(x, exact.plan(segments), None, 0), exact.plan(segments), out_exact)  # type: ignore[arg-type]
    assert torch.equal(out_shared, out_exact)
    # RCC per step (docs/algorithms.md 3.8): up K*32k values + 32k indices, down 32k indices + 32k values
    workers = 4
    sim = Simulator(SHAPES, num_workers=workers, compressor="topk_shared", density=0.1)
    _run(sim, _grads(torch.Generator().manual_seed(2), workers))
    k = 5
    assert sim.stats.take_step()["rcc_step"] == pytest.approx(
        (workers * 32 * k + 3 * 32 * k) / ((workers + 1) * 32 * 55)
    )


@pytest.mark.parametrize(
    "method", ["dgc", "cser", "def_a", "ef", "ef21", "ef_server_momentum", "gmc_lr_inside"]
)
def test_topk_shared_runs_with_the_other_methods(method: str) -> None:
    sim = Simulator(SHAPES, num_workers=2, method=method, compressor="topk_shared", density=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        direction = _run(sim, _grads(gen, 2))
    assert all(torch.isfinite(t).all() for t in direction.values())
    assert sim.stats.take_step()["collectives"] >= 2  # a broadcast before every value all-reduce


def test_bf16_rounding_error_lands_in_the_residual() -> None:
    sim = Simulator(SHAPES, num_workers=2, compressor="topk", density=0.1, momentum=0.0, wire_dtype="bf16")
    grads = _grads(torch.Generator().manual_seed(4), 2)
    direction = _run(sim, grads)
    sent = torch.zeros(55)
    for k in range(2):
        u = torch.cat(list(grads[k].values()))
        support = _topk_support(u)
        rounded = u[support].to(torch.bfloat16).to(torch.float32)
        # C(u) is the rounded vector; the residual keeps u - C(u) (the rounding error on the support)
        expected_residual = u.clone().index_copy_(0, support, u[support] - rounded)
        assert torch.equal(torch.cat(list(sim.residual(k).values())), expected_residual)
        assert bool((expected_residual[support] != 0).any())  # the check can fail: bf16 rounds
        sent.index_add_(0, support, rounded)  # decoded and summed in fp32, in rank order
    assert torch.equal(torch.cat([direction["a"], direction["b"]]), sent / 2)


@pytest.mark.parametrize("compressor", ["none", "rbgs", "topk_shared"])
def test_16_bit_wire_halves_the_value_bytes(compressor: str) -> None:
    # Summed in rank order (docs/algorithms.md 3.10, 3.12): a reduce-scatter of the values padded to K
    # equal chunks and an all-gather of one chunk, a ring all-reduce's 2 (K-1)/K of the padded values on
    # the wire. 16-bit values always, padded per owner ((p + j) mod K); fp32 ones of a sparse support
    # with K >= 3, in contiguous chunks; the identity's fp32 vector in one ring all-reduce.
    workers = 4
    counts = [40, 15] if compressor == "none" else [4, 1]  # the identity's dense vector, or k per parameter
    values = sum(counts)
    owned = [
        sum((p + j) % workers == r for p, n in enumerate(counts) for j in range(n)) for r in range(workers)
    ]
    padded_16 = workers * max(owned)
    padded_32 = -(-values // workers) * workers
    indices = 4 * 5 if compressor == "topk_shared" else 0  # the int32 support broadcast stays
    taken = {}
    for wire in ("fp32", "bf16", "fp16"):
        sim = Simulator(SHAPES, num_workers=workers, compressor=compressor, density=0.1, wire_dtype=wire)
        _run(sim, _grads(torch.Generator().manual_seed(5), workers))
        taken[wire] = sim.stats.take_step()
    ring = 2 * (workers - 1) / workers
    support = (workers - 1) / workers * indices
    if compressor == "none":
        assert taken["fp32"]["bytes_to_collectives"] == 4 * values
        assert taken["fp32"]["bytes_sent"] == pytest.approx(ring * 4 * values)
    else:
        assert taken["fp32"]["bytes_to_collectives"] - indices == 4 * padded_32 + 4 * padded_32 // workers
        assert taken["fp32"]["bytes_sent"] == pytest.approx(ring * 4 * padded_32 + support)
    for wire in ("bf16", "fp16"):
        assert taken[wire]["bytes_to_collectives"] - indices == 2 * padded_16 + 2 * padded_16 // workers
        assert taken[wire]["bytes_sent"] == pytest.approx(ring * 2 * padded_16 + support)
        assert taken[wire]["collectives"] == 2 + (indices > 0)


def test_dense_fallback_route_sends_16_bit_values() -> None:
    # topk at density 0.5 with K = 4 falls back to a dense all-reduce of the decoded vectors; in bf16
    # summed in rank order: a reduce-scatter of the 55 values padded to 56, an all-gather of 14
    sims = {
        wire: Simulator(SHAPES, num_workers=4, compressor="topk", density=0.5, wire_dtype=wire)
        for wire in ("fp32", "bf16")
    }
    for sim in sims.values():
        _run(sim, _grads(torch.Generator().manual_seed(6), 4))
    assert sims["fp32"].stats.take_step()["bytes_to_collectives"] == 4 * 55
    assert sims["bf16"].stats.take_step()["bytes_to_collectives"] == 2 * 56 + 2 * 14


@pytest.mark.parametrize("compressor", ["none", "topk"])
def test_fp16_overflow_raises_instead_of_applying_inf(compressor: str) -> None:
    sim = Simulator(
        SHAPES, num_workers=2, compressor=compressor, density=0.1, momentum=0.0, wire_dtype="fp16"
    )
    # 40000 fits fp16; the sum of two ranks (80000) does not (all-reduce route for "none")
    grads = [
        {name: torch.full((n,), 4.0e4 if compressor == "none" else 1.0e5) for name, n in SIZES.items()}
    ] * 2
    # raised by the exchange itself, before anything is applied (tests/hook/test_fp16_refusal.py)
    with pytest.raises(FloatingPointError, match="overflowed fp16.*'bf16'"):
        _run(sim, grads)
    ok = Simulator(SHAPES, num_workers=2, compressor=compressor, density=0.1, wire_dtype="bf16")
    assert all(torch.isfinite(t).all() for t in _run(ok, grads).values())


def test_wire_dtype_is_validated_with_the_choices_named() -> None:
    with pytest.raises(ValueError, match="'fp32', 'bf16', 'fp16'"):
        GMCConfig(wire_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sends its own packed codes"):
        GMCConfig(compressor="qsgd", wire_dtype="bf16")
    assert GMCConfig(compressor="rbgs", wire_dtype="bf16").build().compressor.value_dtype == torch.bfloat16
