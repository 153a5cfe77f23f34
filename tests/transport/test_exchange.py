"""The exchange over the in-process back-end: routes against a hand-written mean, deferred RCC
accounting, and the torch.distributed back-end's calls on a one-rank group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_gmc import Simulator
from lightning_gmc.compressors import TopK, build_compressor
from lightning_gmc.methods import Message, ParameterTable, WorkerState, build_method
from lightning_gmc.transport import CommStats, Exchange, InProcessCollectives, TorchCollectives

NUMEL = 40


@pytest.mark.parametrize(
    ("compressor", "density", "workers", "route"),
    [
        ("topk", 0.1, 3, "allgather"),
        ("rbgs", 0.1, 3, "allreduce"),
        ("topk", 0.9, 3, "dense"),
        ("topk", 0.1, 1, "local"),
    ],
)
def test_every_route_yields_the_mean_of_the_decoded_messages(
    compressor: str, density: float, workers: int, route: str
) -> None:
    comp = build_compressor(compressor, density=density)
    method = build_method("gmc", comp)
    table = ParameterTable(("w",), (torch.Size([NUMEL]),), (0,))
    states = [WorkerState(method, table, torch.device("cpu"), rank, seed=5) for rank in range(workers)]
    buckets = [state.bucket((0,)) for state in states]
    xs = [torch.randn(NUMEL, generator=torch.Generator().manual_seed(k)) for k in range(workers)]
    # Reference: each worker's C(x_k) decoded on its own, averaged by hand.
    expected = torch.zeros(NUMEL)
    for k in range(workers):
        plan = comp.plan(buckets[k].segments)
        decoded = torch.zeros(NUMEL)
        comp.decompress_add(comp.compress(xs[k], plan, states[k].rng, 0), plan, decoded)
        expected += decoded
    expected /= workers

    stats = CommStats()
    exchange = Exchange(InProcessCollectives(workers), stats)
    messages = []
    for k in range(workers):
        plan = buckets[k].plan(comp)
        messages.append([Message(comp, plan, comp.compress(xs[k], plan, states[k].rng, 0))])
    means = exchange.start(messages, buckets, step=0).wait()
    assert len(means) == workers
    for own in means:
        torch.testing.assert_close(own[0], expected, rtol=0, atol=1e-6)
    assert len({own[0].data_ptr() for own in means}) == workers  # every worker decodes its own copy
    metrics = stats.take_step()
    # a sparse shared support's fp32 values with K = 3 are summed in rank order: a reduce-scatter of the
    # 4 values padded to 3 chunks of 2, then an all-gather of one chunk (docs/algorithms.md 3.10)
    assert metrics["collectives"] == {"local": 0, "allreduce": 2}.get(route, 1)
    payload_nbytes = buckets[0].plan(comp).payload_nbytes
    handed = {"allgather": payload_nbytes, "allreduce": 4 * 6 + 4 * 2, "dense": 4 * NUMEL, "local": 0}
    assert metrics["bytes_to_collectives"] == handed[route]


def _topk_simulator(defer_rcc: bool) -> Simulator:
    sim = Simulator({"w": torch.zeros(NUMEL)}, 2, compressor="topk", density=0.1)
    sim.stats = CommStats(defer_rcc=defer_rcc)
    sim.exchange = Exchange(InProcessCollectives(2), sim.stats)
    return sim


def _step(sim: Simulator, t: int) -> None:
    points = sim.gradient_points({"w": torch.zeros(NUMEL)}, 0.1)
    grads = [{"w": torch.randn(NUMEL, generator=torch.Generator().manual_seed(10 * t + k))} for k in range(2)]
    sim.step(grads, points, 0.1)


def test_deferred_rcc_counts_the_union_only_for_taken_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = TopK.broadcast_bits

    def counting(self, payloads, plan):  # type: ignore[no-untyped-def]
        calls.append(len(payloads))
        return original(self, payloads, plan)

    monkeypatch.setattr(TopK, "broadcast_bits", counting)
    eager, deferred = _topk_simulator(False), _topk_simulator(True)
    for t in range(3):
        _step(deferred, t)
    assert calls == []  # nothing read the metrics yet: no union was counted
    taken = deferred.stats.take_step()
    assert calls == [2]  # only the last step's union, when its metrics are taken
    eager_steps = []
    for t in range(3):
        _step(eager, t)
        eager_steps.append(eager.stats.take_step())
    # RCC: the taken step only (earlier steps dropped their numerator and denominator together);
    # traffic: every step.
    assert taken["rcc"] == pytest.approx(eager_steps[-1]["rcc_step"])
    assert taken["rcc_step"] == pytest.approx(eager_steps[-1]["rcc_step"])
    assert taken["bytes_sent_total"] == pytest.approx(eager_steps[-1]["bytes_sent_total"])


def test_in_process_broadcast_copies_the_source() -> None:
    tensors = [torch.full((3,), float(k)) for k in range(3)]
    assert InProcessCollectives(3).broadcast(tensors, src=2).wait().tolist() == [2.0, 2.0, 2.0]


@pytest.mark.usefixtures("single_rank_group")
def test_torch_collectives_on_a_one_rank_group() -> None:
    assert dist.get_world_size() == 1
    backend = TorchCollectives()
    assert backend.world_size == 1 and list(backend.local_ranks) == [0]
    x = torch.arange(4, dtype=torch.float32)
    assert backend.all_reduce_sum([x]).wait().tolist() == [0.0, 1.0, 2.0, 3.0]
    out = torch.zeros(4, dtype=torch.uint8)
    send = torch.arange(4, dtype=torch.uint8)
    assert backend.all_gather([send], out).wait().tolist() == [0, 1, 2, 3]
    ids = torch.tensor([7, 9], dtype=torch.int32)
    assert backend.broadcast([ids], src=0).wait().tolist() == [7, 9]


def test_start_refuses_messages_or_buckets_of_another_worker_count() -> None:
    comp = build_compressor("topk", density=0.1)
    method = build_method("gmc", comp)
    table = ParameterTable(("w",), (torch.Size([NUMEL]),), (0,))
    states = [WorkerState(method, table, torch.device("cpu"), rank, seed=5) for rank in range(2)]
    buckets = [state.bucket((0,)) for state in states]
    plan = buckets[0].plan(comp)
    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    messages = [[Message(comp, plan, comp.compress(x, plan, states[k].rng, 0))] for k in range(2)]
    exchange = Exchange(InProcessCollectives(2), CommStats())
    with pytest.raises(ValueError, match="2 local workers"):
        exchange.start(messages, buckets[:1], step=0)
    with pytest.raises(ValueError, match="2 local workers"):
        exchange.start(messages[:1], buckets, step=0)
    with pytest.raises(ValueError, match="every worker must send 1 messages"):
        exchange.start([messages[0], messages[1] * 2], buckets, step=0)
