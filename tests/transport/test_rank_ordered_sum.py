"""The summing routes in rank order (``transport/exchange/ordered.py``), against sums written by hand.

With 16-bit values a shared support's ``values`` and the dense route's vectors are added in fp32 in
rank order and rounded once, by the worker that owns the element: element ``j`` of parameter ``p`` (its
``j``-th summed value) belongs to worker ``(p + j) mod K``, which keeps the remainder ``S - round(S)``.
fp32 sums take the same two phases with ``K >= 3`` when deterministic algorithms are on. The
references are numpy float32 sums in rank order, rounded to bf16 element by element.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lightning_gmc.compressors import build_compressor, segments_from_numels
from lightning_gmc.methods import Message, ParameterTable, WorkerState, build_method
from lightning_gmc.transport import CommStats, Exchange, InProcessCollectives, choose_route
from lightning_gmc.transport.exchange.ordered import ownership

NUMELS = (23, 9, 40)  # three parameters, which a bucket may hold in any order
NUMEL = sum(NUMELS)
#: compressor options; top-k at density 0.7 travels by the dense route for every K >= 2
CASES = {
    "rbgs": {"compressor": "rbgs", "density": 0.2},
    "identity": {"compressor": "none"},
    "dense_route": {"compressor": "topk", "density": 0.7},
}


def test_every_element_belongs_to_worker_p_plus_j_mod_k() -> None:
    segments = segments_from_numels([5, 3, 6], param_indices=[7, 2, 4])
    counts = [2, 3, 6]  # e.g. k values of each parameter
    owners = ownership(segments, counts, 3, torch.device("cpu"))
    expected = [(p + j) % 3 for p, n in zip([7, 2, 4], counts, strict=True) for j in range(n)]
    assert owners.chunk == max(expected.count(r) for r in range(3))
    for rank in range(3):
        positions = owners.owned[rank].tolist()
        assert positions == [i for i, r in enumerate(expected) if r == rank]  # in vector order
        # each owned element sits in its owner's chunk, in that order
        assert owners.slots[positions].tolist() == [rank * owners.chunk + t for t in range(len(positions))]


def _exchange(case: str, world: int, layout: tuple[int, ...], wire: str = "bf16") -> dict[str, Any]:
    """Every worker sends one vector (per parameter by index, laid out in ``layout``'s order)."""
    options = CASES[case]
    comp = build_compressor(options["compressor"], density=options.get("density", 0.01), wire_dtype=wire)
    method = build_method("gmc", comp)
    table = ParameterTable(("a", "b", "c"), tuple(torch.Size([n]) for n in NUMELS), (0, 0, 0))
    gen = torch.Generator().manual_seed(0)
    per_param = [[torch.randn(n, generator=gen) * 10 for n in NUMELS] for _ in range(world)]
    messages, buckets = [], []
    for rank in range(world):
        state = WorkerState(method, table, torch.device("cpu"), rank, seed=3)
        bucket = state.bucket(layout)
        x = torch.cat([per_param[rank][i] for i in layout])
        plan = bucket.plan(comp)
        messages.append([Message(comp, plan, comp.compress(x, plan, state.rng, 0))])
        buckets.append(bucket)
    route = choose_route(comp, buckets[0].plan(comp), world)
    stats = CommStats()
    means = Exchange(InProcessCollectives(world), stats).start(messages, buckets, step=0).wait()
    return {
        "messages": messages,
        "means": means,
        "stats": stats.take_step(),
        "route": route,
        "layout": layout,
    }


def _per_parameter(vector: torch.Tensor, layout: tuple[int, ...]) -> list[torch.Tensor]:
    """A bucket-ordered vector split back into parameters, by parameter index."""
    parts = dict(zip(layout, torch.split(vector, [NUMELS[i] for i in layout]), strict=True))
    return [parts[i] for i in range(len(NUMELS))]


def _owners_by_hand(message: Message, layout: tuple[int, ...], world: int) -> torch.Tensor:
    """For every coordinate of the bucket, the worker that owns its sum (-1: not sent)."""
    owner = torch.full((NUMEL,), -1, dtype=torch.int64)
    # a shared sparse support sums its values (value -> coordinate); the dense route the coordinates
    index = message.payload.context.get("index") if message.compressor.shared_support else None
    offset = value = 0
    for param in layout:
        count = (
            NUMELS[param]
            if index is None
            else message.compressor.value_counts(message.plan)[layout.index(param)]
        )
        for j in range(count):
            coordinate = offset + j if index is None else int(index[value + j])
            owner[coordinate] = (param + j) % world
        offset += NUMELS[param]
        value += count
    return owner


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world", [2, 3, 4])
def test_16_bit_sums_are_rank_ordered_in_fp32_and_rounded_once_by_their_owner(case: str, world: int) -> None:
    result = _exchange(case, world, layout=(2, 0, 1))
    assert result["route"] == ("dense" if case == "dense_route" else "allreduce")
    messages = [sent[0] for sent in result["messages"]]
    # what each worker sent, decoded (16-bit values widen exactly), summed by hand in rank order
    decoded = []
    for message in messages:
        out = torch.zeros(NUMEL)
        message.compressor.decompress_add(message.payload, message.plan, out)
        decoded.append(np.asarray(out.numpy(), dtype=np.float32))
    total = decoded[0].copy()
    for vector in decoded[1:]:
        total = np.float32(total + vector)
    exact = torch.from_numpy(total)
    rounded = exact.to(torch.bfloat16).to(torch.float32)
    for own in result["means"]:
        assert torch.equal(own[0], rounded / world)
    # remainders: each at its owner only, together exactly what the rounding dropped
    owner = _owners_by_hand(messages[0], result["layout"], world)
    kept = torch.zeros(NUMEL)
    for rank, message in enumerate(messages):
        assert message.undelivered is not None
        mine = torch.zeros(NUMEL)
        message.undelivered.add_to(mine)
        assert bool((mine[owner != rank] == 0).all())
        kept += mine
    assert torch.equal(kept, exact - rounded)
    assert bool((kept != 0).any())  # the check can fail: bf16 rounds these sums


@pytest.mark.parametrize("case", list(CASES))
def test_each_workers_remainder_does_not_depend_on_the_bucket_layout(case: str) -> None:
    one, other = _exchange(case, 3, (0, 1, 2)), _exchange(case, 3, (2, 1, 0))
    for a, b in zip(one["messages"], other["messages"], strict=True):
        mine, theirs = torch.zeros(NUMEL), torch.zeros(NUMEL)
        a[0].undelivered.add_to(mine)
        b[0].undelivered.add_to(theirs)
        for x, y in zip(
            _per_parameter(mine, one["layout"]), _per_parameter(theirs, other["layout"]), strict=True
        ):
            assert torch.equal(x, y)


def _shares(world: int, counts: list[int]) -> int:
    return max(
        sum((p + j) % world == r for p, n in enumerate(counts) for j in range(n)) for r in range(world)
    )


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bytes_are_a_ring_all_reduce_of_the_padded_vector_in_two_collectives(world: int) -> None:
    result = _exchange("rbgs", world, (0, 1, 2))
    counts = [max(1, int(0.2 * n)) for n in NUMELS]  # k = 4, 1, 8
    padded = world * _shares(world, counts)
    assert result["stats"]["collectives"] == 2  # reduce-scatter, then all-gather
    assert result["stats"]["bytes_to_collectives"] == 2 * padded + 2 * padded // world
    assert result["stats"]["bytes_sent"] == pytest.approx(2 * (world - 1) / world * 2 * padded)


@pytest.mark.parametrize("case", ["identity", "rbgs"])
@pytest.mark.parametrize("world", [2, 3])
def test_fp32_sums_take_the_rank_order_with_three_workers_for_sparse_supports_or_in_deterministic_mode(
    case: str, world: int
) -> None:
    default = _exchange(case, world, (0, 1, 2), wire="fp32")
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = _exchange(case, world, (0, 1, 2), wire="fp32")
    finally:
        torch.use_deterministic_algorithms(False)
    # a ring of 2 adds a + b (rank order's bits): one all-reduce; with 3, a sparse support's values in
    # rank order by default (two collectives), a dense vector only in deterministic mode
    rank_order = world >= 3
    assert default["stats"]["collectives"] == (2 if rank_order and case == "rbgs" else 1)
    assert deterministic["stats"]["collectives"] == (2 if rank_order else 1)
    for a, b in zip(default["means"], deterministic["means"], strict=True):
        assert torch.equal(a[0], b[0])  # in one process every order is rank order
    assert all(sent[0].undelivered is None for sent in deterministic["messages"])  # nothing rounded
