"""The in-process ``hierarchy="node"`` simulator against the flat simulator, bit for bit.

N nodes of G virtual ranks (reduce-scatter of each node's gradients, the method on each local rank's
shard between nodes, all-gather of the directions) against K = N flat workers fed each node's mean
gradient, added in rank order and divided by G as written out here. With no parameter split the two
must agree bit for bit for every method and compressor; with split parameters they must agree with a
flat run over the pieces as parameters (each piece is its own compressor segment with its own
random key). Traffic and state per rank against formulas written out by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_gmc import HierarchicalSimulator, Simulator
from lightning_gmc.methods import ParameterTable

# The shapes of tests/helpers.make_model("small"): 998 elements.
SHAPES = {"0.weight": (32, 24), "0.bias": (32,), "2.weight": (6, 32), "2.bias": (6,)}
NUMEL = 998
LR = 0.1
STEPS = 4
NO_SPLIT = 10**9

CASES: dict[str, dict[str, Any]] = {
    "gmc topk": {"compressor": "topk", "density": 0.1},
    "gmc topk_approx": {"compressor": "topk_approx", "density": 0.1},
    "gmc randk": {"compressor": "randk", "density": 0.1},
    "gmc rbgs": {"compressor": "rbgs", "density": 0.1},
    "gmc none": {"compressor": "none"},
    "gmc topk_shared bf16": {"compressor": "topk_shared", "density": 0.1, "wire_dtype": "bf16"},
    "gmc topk fp16": {"compressor": "topk", "density": 0.1, "wire_dtype": "fp16"},
    "gmc qsgd": {"compressor": "qsgd"},
    "gmc natural": {"compressor": "natural"},
    "gmc natural_dithering": {"compressor": "natural_dithering"},
    "gmc scaled_sign": {"compressor": "scaled_sign"},
    "gmc terngrad": {"compressor": "terngrad"},
    "gmc sd_l1": {"compressor": "sd_l1", "density": 0.1},
    "gmc spherical_rc": {"compressor": "spherical_rc", "density": 0.1},
    "gmc+ rbgs (detach)": {"compressor": "rbgs", "density": 0.1, "detach": 0.5},
    "dgc randk": {"method": "dgc", "compressor": "randk", "density": 0.1},
    "cser topk (H=2)": {"method": "cser", "compressor": "topk", "density": 0.1, "reset_interval": 2},
    "def_a topk (detach)": {"method": "def_a", "compressor": "topk", "density": 0.1},
    "ef topk": {"method": "ef", "compressor": "topk", "density": 0.1},
    "ef21 topk": {"method": "ef21", "compressor": "topk", "density": 0.1},
    "dmsgd": {"method": "dmsgd"},
    "ef_server_momentum (detach)": {"method": "ef_server_momentum", "compressor": "topk", "detach": 0.5},
    "gmc_lr_inside topk": {"method": "gmc_lr_inside", "compressor": "topk", "density": 0.1},
}


#: Compressors whose payload packs bits into bytes per message (the rest send whole elements).
def SUMMED_IN_RANK_ORDER(workers: int) -> set[str]:  # noqa: N802 (reads as the set it is)
    """The cases whose values are summed in rank order with ``workers`` workers."""
    sixteen_bit = {"gmc topk_shared bf16"}
    sparse_fp32 = {"gmc randk", "gmc rbgs", "gmc+ rbgs (detach)", "dgc randk"}
    return sixteen_bit | (sparse_fp32 if workers >= 3 else set())


PACKED = {"gmc terngrad", "gmc sd_l1", "gmc spherical_rc", "gmc qsgd", "gmc natural", "gmc natural_dithering"}


def _options(case: dict[str, Any]) -> dict[str, Any]:
    if case.get("method") in ("ef", "ef21"):
        return dict(case)  # the caller's optimizer owns momentum and weight decay
    return {"momentum": 0.9, "weight_decay": 1e-3, **case}


def _random(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def _node_mean(grads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """((g_0 + g_1) + g_2) ... / G: the reduce-scatter adds in rank order, in fp32."""
    total = {name: tensor.clone() for name, tensor in grads[0].items()}
    for grad in grads[1:]:
        for name in total:
            total[name] += grad[name]
    return {name: tensor / len(grads) for name, tensor in total.items()}


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in got:
        assert torch.equal(got[name], want[name]), f"{what}: {name}"


@pytest.mark.parametrize(("nodes", "per_node"), [(2, 3), (3, 2)])
@pytest.mark.parametrize("name", list(CASES))
def test_without_split_parameters_it_is_the_flat_simulator_fed_node_means(
    name: str, nodes: int, per_node: int
) -> None:
    case = _options(CASES[name])
    flat = Simulator(SHAPES, num_workers=nodes, **case)
    hier = HierarchicalSimulator(SHAPES, nodes=nodes, ranks_per_node=per_node, min_piece=NO_SPLIT, **case)
    assert hier.plan.split_params == ()
    gen = torch.Generator().manual_seed(1)
    w = [_random(SHAPES, gen)] * nodes
    for step in range(STEPS):
        points, flat_points = hier.gradient_points(w[0], LR), flat.gradient_points(w[0], LR)
        for node in range(nodes):
            _assert_equal(points[node], flat_points[node], f"step {step} node {node} gradient point")
        grads = [_random(SHAPES, gen) for _ in range(nodes * per_node)]
        means = [_node_mean(grads[n * per_node : (n + 1) * per_node]) for n in range(nodes)]
        got, want = hier.step(grads, points, LR), flat.step(means, flat_points, LR)
        # Between nodes a node's local ranks together send what one flat worker sends; bit-packed
        # payloads (one message per shard instead of one per bucket) round each shard's bits up to
        # whole bytes and repeat its scalars: at most 16 bytes per extra message and receiver.
        inter = sum(stats.take_step()["bytes_sent"] for stats in hier.inter_stats)
        flat_bytes = flat.stats.take_step()["bytes_sent"]
        if name in PACKED:
            assert 0 <= inter - flat_bytes <= 16 * (per_node - 1) * (nodes - 1), f"step {step}"
        elif name in SUMMED_IN_RANK_ORDER(nodes):
            # A sum in rank order pads each message to K chunks (fp32: fewer than K elements; 16-bit,
            # laid out by owner: at most one element per parameter and worker), and the node sends
            # one message per shard where the flat worker sends one: the padding differs by at most
            # that much per message, 2 (K-1)/K on the wire.
            itemsize = 2 if "bf16" in name else 4
            per_message = nodes * (len(SHAPES) if itemsize == 2 else 1) * itemsize * 2 * (nodes - 1) / nodes
            assert abs(inter - flat_bytes) <= (per_node + 1) * per_message, f"step {step}"
        else:
            assert inter == pytest.approx(flat_bytes, rel=1e-12), f"step {step}"
        for node in range(nodes):
            _assert_equal(got[node], want[node], f"step {step} node {node} direction")
            for buffer, by_name in flat.worker_state(node).items():
                _assert_equal(hier.worker_state(node)[buffer], by_name, f"step {step} node {node} {buffer}")
        w = [{k: v - LR * got[n][k] for k, v in w[n].items()} for n in range(nodes)]
    _assert_equal(hier.evaluation_params(w, LR), flat.evaluation_params(w, LR), "evaluation model")


def _piece_simulator(plan: Any, case: dict[str, Any], nodes: int) -> Simulator:
    """A flat simulator whose parameters are the plan's pieces, each with the plan's random key."""
    pieces = plan.pieces
    sim = Simulator({p.name: torch.Size([p.numel]) for p in pieces}, num_workers=nodes, **case)
    sim.table = ParameterTable(
        sim.table.names, sim.table.shapes, sim.table.groups, tuple(p.key for p in pieces)
    )
    sim.workers = sim._build_workers(case.get("seed", 0))
    return sim


def _to_pieces(plan: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = plan.table.names
    return {p.name: tensors[names[p.param]].reshape(-1)[p.start : p.stop] for p in plan.pieces}


@pytest.mark.parametrize(
    "name",
    ["gmc topk", "gmc randk", "gmc rbgs", "gmc topk_shared bf16", "gmc+ rbgs (detach)", "cser topk (H=2)"],
)
def test_split_parameters_are_compressed_piece_by_piece_with_their_own_keys(name: str) -> None:
    nodes, per_node = 2, 3
    case = _options(CASES[name])
    hier = HierarchicalSimulator(SHAPES, nodes=nodes, ranks_per_node=per_node, min_piece=64, **case)
    assert hier.plan.split_params == (0, 2)
    pieces = _piece_simulator(hier.plan, case, nodes)
    gen = torch.Generator().manual_seed(2)
    w = [_random(SHAPES, gen)] * nodes
    for step in range(STEPS):
        points = hier.gradient_points(w[0], LR)
        piece_points = pieces.gradient_points(_to_pieces(hier.plan, w[0]), LR)
        grads = [_random(SHAPES, gen) for _ in range(nodes * per_node)]
        means = [
            _to_pieces(hier.plan, _node_mean(grads[n * per_node : (n + 1) * per_node])) for n in range(nodes)
        ]
        got, want = hier.step(grads, points, LR), pieces.step(means, piece_points, LR)
        for node in range(nodes):
            _assert_equal(_to_pieces(hier.plan, got[node]), want[node], f"step {step} node {node}")
        w = [{k: v - LR * got[n][k] for k, v in w[n].items()} for n in range(nodes)]


def test_intra_node_bytes_are_the_2d_floor_plus_padding_and_one_status_element() -> None:
    """The small model at min_piece=64 (plans by hand, tests/methods/test_shards.py's rule):
    G = 2: 0.weight split 384/384, 0.bias to rank 0, 2.weight 96/96, 2.bias to rank 1: shards 512 and
    486, chunk 512. G = 3: 256 x 3, bias to 0, 64 x 3, bias to 1: shards 352, 326, 320, chunk 352.
    A reduce-scatter of the chunk and an all-gather of the chunk plus one status element, fp32, each
    rank sending (G-1) chunks; the 2-D floor is 2 (G-1)/G * 4n."""
    for per_node, shards, chunk in ((2, (512, 486), 512), (3, (352, 326, 320), 352)):
        hier = HierarchicalSimulator(
            SHAPES, nodes=2, ranks_per_node=per_node, min_piece=64, compressor="topk"
        )
        assert hier.plan.bucket(range(4)).shard_numels == shards
        gen = torch.Generator().manual_seed(3)
        w = _random(SHAPES, gen)
        hier.step([_random(SHAPES, gen) for _ in range(2 * per_node)], hier.gradient_points(w, LR), LR)
        expected = (per_node - 1) * 4 * chunk + (per_node - 1) * 4 * (chunk + 1)
        assert hier.take_intra_bytes() == expected
        floor = 2 * (per_node - 1) / per_node * 4 * NUMEL
        assert 1.0 < expected / floor < 1.07
        # Method state: each rank holds GMC's two buffers of its shard only; together the flat state.
        states = [8 * hier.plan.local_numel(r) for r in range(per_node)]
        assert states == [8 * n for n in shards] and sum(states) == 8 * NUMEL
    plus = HierarchicalSimulator(
        SHAPES, nodes=2, ranks_per_node=2, min_piece=64, compressor="rbgs", detach=0.5
    )
    w = _random(SHAPES, torch.Generator().manual_seed(4))
    plus.gradient_points(w, LR)  # the detached point needs the full residual: one all-gather of it
    assert plus.take_intra_bytes() == 1 * 4 * 512


def test_a_flat_run_continues_as_nodes_of_any_size_and_back() -> None:
    """Residuals belong to workers: K = 2 flat workers continue as 2 nodes of 3 ranks, then of 2, then
    flat again, and every worker's buffers come back bit for bit through the splits and merges."""
    case = _options(CASES["gmc topk"])
    gen = torch.Generator().manual_seed(5)
    w = _random(SHAPES, gen)
    flat = Simulator(SHAPES, num_workers=2, **case)
    for _ in range(2):
        flat.step([_random(SHAPES, gen) for _ in range(2)], flat.gradient_points(w, LR), LR)
    wide = HierarchicalSimulator(SHAPES, nodes=2, ranks_per_node=3, min_piece=64, **case)
    wide.continue_from(flat)
    narrow = HierarchicalSimulator(SHAPES, nodes=2, ranks_per_node=2, min_piece=64, **case)
    narrow.continue_from(wide)
    back = Simulator(SHAPES, num_workers=2, **case)
    back.continue_from(narrow)
    for worker in range(2):
        for buffer, by_name in flat.worker_state(worker).items():
            _assert_equal(back.worker_state(worker)[buffer], by_name, f"worker {worker} {buffer}")
    assert (back.step_index, back._prev_lr) == (2, LR)
    with pytest.raises(ValueError, match="2 workers cannot continue as 3"):
        Simulator(SHAPES, num_workers=3, **case).continue_from(flat)


def test_the_pieces_of_a_split_parameter_draw_their_own_random_supports() -> None:
    """random-k on one parameter split in two pieces of 4096 elements: with a key per piece the two
    supports differ (two shared keys would draw the same positions in each piece), and the whole
    parameter beside them keeps the key a flat run gives it (its support is the flat simulator's)."""
    shapes = {"w": (8192,), "b": (4096,)}
    case = {"compressor": "randk", "density": 0.01, "momentum": 0.0}
    hier = HierarchicalSimulator(shapes, nodes=2, ranks_per_node=2, min_piece=3000, **case)
    assert hier.plan.split_params == (0,)
    flat = Simulator(shapes, num_workers=2, **case)
    ones = [{name: torch.ones(shape) for name, shape in shapes.items()} for _ in range(4)]
    w = {name: torch.zeros(shape) for name, shape in shapes.items()}
    got = hier.step(ones, hier.gradient_points(w, LR), LR)[0]
    want = flat.step(ones[:2], flat.gradient_points(w, LR), LR)[0]
    first, second = got["w"][:4096].nonzero().flatten(), got["w"][4096:].nonzero().flatten()
    assert first.numel() == second.numel() == 40
    assert not torch.equal(first, second)
    assert torch.equal(got["b"].nonzero(), want["b"].nonzero())
