"""``hierarchy="node"``'s sharded 2-D reducer on real process groups: 2 nodes x 2 ranks and 2 nodes
x 3 ranks (gloo, plain DDP + ``gmc_hook``, tests/hierarchy_script.py) against the in-process
:class:`~lightning_gmc.HierarchicalSimulator`, bit for bit; replicas, resumes (also across flat <->
node and across G), intra- and inter-node bytes against formulas written out here, the groups'
timeout, and errors that reach every rank. One launch per layout runs every case; a third launch
kills a rank (tests/hierarchy_failure_script.py).

The model is tests/helpers' ``two_buckets`` MLP (278,534 parameters; with ``bucket_cap_mb=0.25``
DDP builds several buckets), so the default shard plan splits its three large weights.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import loss_fn, lr_at, make_dataset, make_model, rank_batch
from launch import TESTS, launch_ranks

from lightning_gmc import HierarchicalSimulator, Simulator
from lightning_gmc.methods import GroupHyper, ParameterTable
from lightning_gmc.methods.shards import DEFAULT_MIN_PIECE, plan_shards
from lightning_gmc.plan import Arm, arm_traffic

SCRIPT = TESTS / "hierarchy_script.py"
FAILURE_SCRIPT = TESTS / "hierarchy_failure_script.py"
NODES = 2
TOPK = {"compressor": "topk", "density": 0.05}
BASE: dict[str, Any] = {
    "model": "two_buckets",
    "lr": 0.1,
    "steps": 4,
    "checkpoint_at": 2,
    "batch_size": 8,
    "num_samples": 96,
    "min_piece": DEFAULT_MIN_PIECE,
    "bucket_cap_mb": 0.25,
    "timeout_s": 60,
}
CASES_2X2: dict[str, Any] = {
    # its resume first tries a copy of the checkpoint with rank 1's residual of the wrong shape
    "gmc_topk": {"config": TOPK, "corrupt_entry": 1},
    "gmc_plus_rbgs": {"config": {"compressor": "rbgs", "density": 0.05, "detach": 0.5, "seed": 3}},
    # the leader's support broadcast runs over each local rank's inter-node group
    "topk_shared_bf16": {"config": {"compressor": "topk_shared", "density": 0.05, "wire_dtype": "bf16"}},
    "pair_topk": {"mode": "pair", "config": TOPK},  # flat, one rank per node: K = 2 workers
    "node_from_pair": {"load": "pair_topk.ckpt", "config": TOPK},
    "pair_from_node": {"mode": "pair", "load": "gmc_topk.ckpt", "config": TOPK},
    "nonfinite_raise": {
        "error": True,
        "config": {**TOPK, "nonfinite": "raise"},
        "nan_rank": 1,
        "bad_step": 1,
    },
    "fp16_overflow": {"error": True, "config": {**TOPK, "wire_dtype": "fp16"}, "huge_rank": 0, "bad_step": 1},
}
CASES_2X3: dict[str, Any] = {
    "gmc_topk": {"config": TOPK},
    "cser": {"config": {"method": "cser", **TOPK, "method_options": {"reset_interval": 2}}},
    "def_a": {"config": {"method": "def_a", **TOPK}},
    "from_2x2": {"config": TOPK},  # loads the 2 x 2 launch's gmc_topk checkpoint (path set below)
}
NAMES = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
# The default shard plan of the two_buckets model, by hand (methods/shards.py's rule): elements each
# local rank owns of every parameter. G = 2 (split from 4096 elements): 0.weight 6144 | 6144, 0.bias
# to the less loaded rank 0 (a tie), 2.weight 131072 | 131072, 2.bias to rank 1, 4.weight (3072, whole)
# to rank 0 (a tie at 137728), 4.bias to rank 1. G = 3 (split from 6144): 0.weight 4096 x 3, 0.bias to
# 0, 2.weight 87382 | 87381 | 87381, 2.bias to 1, 4.weight to 2 (least loaded), 4.bias to 1.
OWNED = {
    2: {"0.weight": (6144, 6144), "0.bias": (512, 0), "2.weight": (131072, 131072), "2.bias": (0, 512),
        "4.weight": (3072, 0), "4.bias": (0, 6)},
    3: {"0.weight": (4096,) * 3, "0.bias": (512, 0, 0), "2.weight": (87382, 87381, 87381),
        "2.bias": (0, 512, 0), "4.weight": (0, 0, 3072), "4.bias": (0, 6, 0)},
}  # fmt: skip


def _launch(out_dir: Path, per_node: int, cases: dict[str, Any]) -> list[dict[str, Any]]:
    cfg = {**BASE, "ranks_per_node": per_node, "cases": cases, "out_dir": str(out_dir)}
    (out_dir / "config.json").write_text(json.dumps(cfg))
    world = NODES * per_node
    launch_ranks([SCRIPT, out_dir / "config.json"], world, ranks_per_node=per_node, timeout=900)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("two_by_two")
    return out_dir, _launch(out_dir, 2, CASES_2X2)


@pytest.fixture(scope="module")
def two_by_three(
    tmp_path_factory: pytest.TempPathFactory, two_by_two: tuple[Path, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    cases = {**CASES_2X3, "from_2x2": {**CASES_2X3["from_2x2"], "load": str(two_by_two[0] / "gmc_topk.ckpt")}}
    return _launch(tmp_path_factory.mktemp("two_by_three"), 3, cases)


def _results(
    layout: str, two_by_two: Any, request: pytest.FixtureRequest
) -> tuple[int, list[dict[str, Any]]]:
    if layout == "2x2":
        return 2, two_by_two[1]
    return 3, request.getfixturevalue("two_by_three")


# ------------------------------------------------------------------------------------- replay
def replay(config: dict[str, Any], phases: list[tuple[str, int, int, int]]) -> list[dict[str, Any]]:
    """The run in the simulators, phase by phase: ``(kind, G, first step, end step)`` with kind
    ``"node"`` (HierarchicalSimulator, every rank's gradient) or ``"pair"`` (the flat simulator with
    one worker per node, fed local rank 0's gradient); each phase continues the last one's state, as
    a resume does. Per step: each node's parameters and buffers, inter-node bytes per node and
    intra-node bytes per rank."""
    torch.set_num_threads(1)
    config = dict(config)
    options = config.pop("method_options", {})
    model = make_model(BASE["model"], 0)
    data = make_dataset(BASE["num_samples"], 1)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    hyper = {"momentum": 0.9, "weight_decay": 1e-3, **config, **options}
    w = [{name: p.detach().clone() for name, p in model.named_parameters()} for _ in range(NODES)]
    sim: Simulator | None = None
    history: list[dict[str, Any]] = []
    for kind, per_node, first, end in phases:
        if kind == "node":
            following: Simulator = HierarchicalSimulator(
                shapes, nodes=NODES, ranks_per_node=per_node, min_piece=BASE["min_piece"], **hyper
            )
        else:
            following = Simulator(shapes, num_workers=NODES, **hyper)
        if sim is not None:
            following.continue_from(sim)
        sim, world = following, NODES * per_node
        for step in range(first, end):
            lr = lr_at(step, BASE["lr"], "cosine", BASE["steps"])
            if sim.method.detach_scale(GroupHyper(lr, lr, 0.9, 1e-3)):
                points = sim.gradient_points(w[0], lr)  # one model on every node (no CSER here)
            else:
                points = [{k: v.clone() for k, v in w[n].items()} for n in range(NODES)]
            ranks = range(world) if kind == "node" else range(0, world, per_node)
            grads = []
            for rank in ranks:
                model.zero_grad()
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        p.copy_(points[rank // per_node][name])
                x, y = rank_batch(data, rank, world, BASE["batch_size"], step)
                loss_fn(model, x, y).backward()
                grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
            directions = sim.step(grads, points, lr)
            w = [
                {k: v.clone().add_(directions[n][k], alpha=-lr) for k, v in w[n].items()}
                for n in range(NODES)
            ]
            if isinstance(sim, HierarchicalSimulator):
                inter = sum(stats.take_step()["bytes_sent"] for stats in sim.inter_stats)
                intra = sim.take_intra_bytes()
            else:
                inter, intra = sim.stats.take_step()["bytes_sent"], 0.0
            states = [sim.worker_state(n) for n in range(NODES)]
            history.append({"params": w, "state": states, "inter": inter, "intra": intra})
    return history


def _merged_state(ranks: list[dict[str, Any]], per_node: int, step: int, key: str) -> dict[str, Any]:
    """A node's full buffers, merged from its ranks' pieces (each rank's state_dict holds its own)."""
    table = ParameterTable(
        NAMES, tuple(make_model(BASE["model"], 0).state_dict()[n].shape for n in NAMES), (0,) * 6
    )
    plan = plan_shards(table, per_node, BASE["min_piece"])
    merged: dict[str, Any] = {}
    for scope in ("local", "shared"):
        shards = [rank[key][step]["state"][scope] for rank in ranks]
        merged.update(plan.merge_buffers(shards))
    return merged


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_against(
    results: list[dict[str, Any]], per_node: int, case: str, key: str, expected: list[Any]
) -> None:
    if case.startswith("pair"):  # only local rank 0 of each node took part
        results = [results[n * per_node] for n in range(NODES)]
        per_node = 1
    entries = [r[case][key] for r in results]
    offset = len(expected) - len(entries[0])  # a loaded run starts at its checkpoint's step
    for rank, history in enumerate(entries):
        node = rank // per_node
        for step, got in enumerate(history):
            want = expected[offset + step]
            assert _equal(got["params"], want["params"][node]), f"{case} rank {rank} step {offset + step}"
    if case.startswith("pair"):  # a flat rank's state is its worker's, whole
        for node, history in enumerate(entries):
            for step, got in enumerate(history):
                state = {**got["state"]["local"], **got["state"]["shared"]}
                for buffer, by_name in expected[offset + step]["state"][node].items():
                    assert _equal(state[buffer], by_name), f"{case} node {node} step {offset + step} {buffer}"
        return
    for node in range(NODES):
        ranks = results[node * per_node : (node + 1) * per_node]
        for step in range(len(entries[0])):
            merged = _merged_state([r[case] for r in ranks], per_node, step, key)
            for buffer, by_name in expected[offset + step]["state"][node].items():
                assert _equal(merged[buffer], by_name), f"{case} node {node} step {offset + step} {buffer}"


# -------------------------------------------------------------------------------------- tests
NODE_CASES = [("2x2", "gmc_topk"), ("2x2", "gmc_plus_rbgs"), ("2x2", "topk_shared_bf16")]
NODE_CASES += [("2x3", "gmc_topk"), ("2x3", "cser"), ("2x3", "def_a")]


@pytest.mark.parametrize(("layout", "case"), NODE_CASES)
def test_runs_equal_the_hierarchical_simulator_and_resume_bitwise(
    layout: str, case: str, two_by_two: Any, request: pytest.FixtureRequest
) -> None:
    per_node, results = _results(layout, two_by_two, request)
    cases = CASES_2X2 if layout == "2x2" else CASES_2X3
    expected = replay(cases[case]["config"], [("node", per_node, 0, BASE["steps"])])
    _check_against(results, per_node, case, "run", expected)
    # Replicas: bit-identical within the node (and across nodes but for CSER's per-node models).
    for rank, result in enumerate(results):
        reference = results[0 if case != "cser" else (rank // per_node) * per_node][case]["run"]
        for step, entry in enumerate(result[case]["run"]):
            assert _equal(entry["params"], reference[step]["params"]), (rank, step)
    # Resume from the checkpoint after 2 steps: every parameter and every rank's pieces, bitwise.
    for result in results:
        tail = result[case]["run"][BASE["checkpoint_at"] :]
        for got, want in zip(result[case]["resumed"], tail, strict=True):
            assert _equal(got["params"], want["params"])
            for scope in ("local", "shared"):
                for buffer, by_name in want["state"][scope].items():
                    assert _equal(got["state"][scope][buffer], by_name), (scope, buffer)
            assert got["metrics"]["bytes_sent_total"] == want["metrics"]["bytes_sent_total"]


@pytest.mark.parametrize(("layout", "case"), NODE_CASES)
def test_traffic_and_state_per_rank_are_exact(
    layout: str, case: str, two_by_two: Any, request: pytest.FixtureRequest
) -> None:
    """Intra-node, per rank and step, for each bucket of ``b`` elements with chunk ``S`` (the largest
    shard of the bucket, from OWNED): a reduce-scatter of ``S`` and an all-gather of ``S + 1`` (the
    status) fp32 values, ``(G-1) 4 (2 S + 1)`` bytes, against the floor ``2 (G-1)/G 4 b``; plus, for
    a detached point, an all-gather of the largest shard of the residual. Inter-node: a node's ranks
    together send what the simulator's node sends. State: GMC-family methods keep two fp32 buffers of
    the rank's shard."""
    per_node, results = _results(layout, two_by_two, request)
    cases = CASES_2X2 if layout == "2x2" else CASES_2X3
    expected = replay(cases[case]["config"], [("node", per_node, 0, BASE["steps"])])
    owned = OWNED[per_node]
    shard_totals = [sum(owned[name][rank] for name in NAMES) for rank in range(per_node)]
    detach = "detach" in cases[case]["config"] or case == "def_a"
    config = cases[case]["config"]
    arm = Arm(
        config.get("method", "gmc"),
        config["compressor"],
        config["density"],
        config.get("detach", 0.0),
        "node",
        config.get("wire_dtype", "fp32"),
    )
    numels = [p.numel() for p in make_model(BASE["model"], 0).parameters()]
    for rank, result in enumerate(results):
        for step, entry in enumerate(result[case]["run"]):
            intra = floor = 0.0
            for bucket in entry["buckets"]:
                chunk = max(sum(owned[NAMES[p]][r] for p in bucket) for r in range(per_node))
                intra += (per_node - 1) * 4 * (2 * chunk + 1)
                floor += 2 * (per_node - 1) / per_node * 4 * sum(sum(owned[NAMES[p]]) for p in bucket)
            assert intra < 1.05 * floor  # the padding of balanced shards and one status element
            if detach:
                intra += (per_node - 1) * 4 * max(shard_totals)
            assert entry["metrics"]["bytes_sent_intra"] == intra, (rank, step)
            # the cost model predicts these bytes from the same shard plan and formulas
            planned = arm_traffic(arm, numels, entry["buckets"], nodes=NODES, ranks_per_node=per_node)
            assert planned.intra_bytes == intra, (rank, step)
            assert entry["metrics"]["bytes_sent_inter"] == entry["metrics"]["bytes_sent"]
            assert entry["state_bytes"] == 2 * 4 * shard_totals[rank % per_node]
    for node in range(NODES):
        ranks = results[node * per_node : (node + 1) * per_node]
        for step, want in enumerate(expected):
            sent = [r[case]["run"][step]["metrics"]["bytes_sent_inter"] for r in ranks]
            assert sum(sent) == pytest.approx(want["inter"], rel=1e-12) and all(s > 0 for s in sent)


def test_resume_across_flat_and_node_and_across_ranks_per_node(
    two_by_two: Any, two_by_three: list[dict[str, Any]]
) -> None:
    """Residuals belong to the K = 2 workers: a flat run of one rank per node resumes as 2 x 2, a
    2 x 2 run resumes flat, and as 2 x 3; each equals the simulators run in the same phases."""
    results = two_by_two[1]
    at, end = BASE["checkpoint_at"], BASE["steps"]
    _check_against(results, 2, "pair_topk", "run", replay(TOPK, [("pair", 2, 0, end)]))
    _check_against(
        results, 2, "node_from_pair", "loaded", replay(TOPK, [("pair", 2, 0, at), ("node", 2, at, end)])
    )
    _check_against(
        results, 2, "pair_from_node", "loaded", replay(TOPK, [("node", 2, 0, at), ("pair", 2, at, end)])
    )
    # The 2 x 3 run resumed the 2 x 2 run's checkpoint: its first two steps ran on 4 ranks.
    across = replay(TOPK, [("node", 2, 0, at), ("node", 3, at, end)])
    _check_against(two_by_three, 3, "from_2x2", "loaded", across)


def test_errors_one_rank_sees_stop_every_rank_with_the_same_message(two_by_two: Any) -> None:
    """``nonfinite="raise"`` with a NaN batch on global rank 1 only, and fp16 values overflowing on
    the wire after global rank 0's loss was scaled by 1e9: all four ranks raise, the same text."""
    results = two_by_two[1]
    nan = [r["nonfinite_raise"]["error"] for r in results]
    assert all(e == nan[0] for e in nan), nan
    assert "FloatingPointError: non-finite gradient in bucket" in nan[0]
    assert "at step 1 on global rank 1 (node 0, local rank 1)" in nan[0]
    overflow = [r["fp16_overflow"]["error"] for r in results]
    core = [e.split(" This rank's error:")[0] if e else e for e in overflow]
    assert all(e == core[0] for e in core), overflow
    assert "overflowed fp16 on the wire in the inter-node exchange of local rank(s) [0, 1]" in core[0]
    assert "at step 1" in core[0] and "Use wire_dtype='bf16'" in core[0]
    # The shards' state of the overflowing step is not undone under the hierarchy: nothing of it may be
    # saved, on any rank.
    assert [r["fp16_overflow"]["save_refused"] for r in results] == [True] * len(results)


def test_a_bad_entry_of_one_rank_fails_on_every_rank_alike(two_by_two: Any) -> None:
    """Every rank reads every rank's entry of the gathered file (full per-parameter tensors, whatever
    the shards), so rank 1's bad residual stops all four ranks at load time with one message naming
    the field; the good file then still resumes bit for bit (the resume test above)."""
    errors = [result["gmc_topk"]["corrupt_error"] for result in two_by_two[1]]
    assert errors[0] != [None] and errors == [errors[0]] * len(errors), errors
    assert re.search(r"per_rank_local\[1\]\.buffers\['residual'\]\['[\w.]+'\] has shape", errors[0][0])


def test_node_groups_take_the_default_group_s_timeout(two_by_two: Any) -> None:
    for result in two_by_two[1]:
        assert result["timeouts"] == [timedelta(seconds=BASE["timeout_s"])] * 3


def test_a_dead_rank_stops_every_rank_with_a_named_error() -> None:
    """Global rank 3 (node 1, local rank 1) disappears before step 3. Its node's other rank fails in
    the intra-node reduce-scatter; node 0's ranks see their inter-node exchanges fail and stop
    together after the all-gather's status, with one message. Nobody finishes step 3."""
    # A rank still running after 300 s hung after its peer died: the launch fails and names it.
    finished = launch_ranks([FAILURE_SCRIPT], 4, ranks_per_node=2, timeout=300, check=False)
    runs = [(f.returncode, f.stdout, f.stderr) for f in finished]
    assert runs[3][0] == 0 and "finished step 2" in runs[3][1] and "finished step 3" not in runs[3][1]
    for rank in range(3):
        code, out, err = runs[rank]
        assert code != 0 and "finished step 2" in out, (rank, out, err[-2000:])
        assert "finished step 3" not in out and "done" not in out, (rank, out)
        assert "no update was applied" in err, (rank, err[-3000:])
    assert "the intra-node reduce_scatter of the gradient of bucket 0" in runs[2][2], runs[2][2][-3000:]
    assert (
        "at step 3 failed on global rank 2 (node 1, local rank 0; rank 1 of the inter-node group)"
        in runs[2][2]
    )
    for rank in (0, 1):
        expected = (
            "the inter-node exchange of local rank(s) [0, 1] of node 0 (global rank(s) [0, 1]) in bucket 0"
        )
        assert expected in runs[rank][2], runs[rank][2][-3000:]
        assert "at step 3 failed" in runs[rank][2]
