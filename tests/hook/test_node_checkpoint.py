"""Which entry of a gathered checkpoint a rank resumes from, across topologies: residuals belong to
the K workers (ranks under ``hierarchy="flat"``, nodes under ``"node"``), so any topology with the
same K reuses them and another K follows ``on_world_size_change``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_gmc.hook.node_checkpoint import select_worker_entry, workers_of

FLAT = {"hierarchy": "flat"}


def _node(nodes: int, per_node: int) -> dict[str, Any]:
    return {"hierarchy": "node", "num_nodes": nodes, "ranks_per_node": per_node}


def _block(topology: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A gathered block whose entry ``r`` holds the marker ``r`` (and rank ``r``'s traffic totals)."""
    entries = [
        {"buffers": {"residual": {"w": torch.full((2,), float(r))}}, "stats": {"bytes_sent_total": float(r)}}
        for r in range(world_size)
    ]
    return {"world_size": world_size, "per_rank_local": entries, "topology": topology}


def _marker(entry: dict[str, Any] | None) -> float:
    assert entry is not None
    return float(entry["buffers"]["residual"]["w"][0])


def test_workers_of_a_topology() -> None:
    assert workers_of(FLAT, 4) == (4, 1)
    assert workers_of(_node(2, 3), 6) == (2, 3)


def test_the_same_topology_takes_this_rank_s_own_entry_with_its_totals() -> None:
    entry = select_worker_entry(_block(_node(2, 2), 4), _node(2, 2), rank=3, world_size=4, policy="error")
    assert _marker(entry) == 3 and entry is not None and entry["stats"]["bytes_sent_total"] == 3.0


@pytest.mark.parametrize(
    ("saved", "saved_world", "current", "world", "expected"),
    [
        # flat with one rank per node -> nodes of 2: rank r is node r // 2, flat worker r // 2
        (FLAT, 2, _node(2, 2), 4, [0, 0, 1, 1]),
        # nodes of 2 -> flat: rank r is worker r, whose entry is the first of node r's ranks
        (_node(2, 2), 4, FLAT, 2, [0, 2]),
        # nodes of 2 -> nodes of 3 (the same two workers)
        (_node(2, 2), 4, _node(2, 3), 6, [0, 0, 0, 2, 2, 2]),
    ],
)
def test_another_topology_with_the_same_workers_takes_its_worker_s_entry(
    saved: dict[str, Any], saved_world: int, current: dict[str, Any], world: int, expected: list[int]
) -> None:
    block = _block(saved, saved_world)
    entries = [select_worker_entry(block, current, rank, world, "error") for rank in range(world)]
    assert [_marker(e) for e in entries] == expected
    assert all(e is not None and "stats" not in e for e in entries)  # totals: the file's top level


def test_another_number_of_workers_follows_the_policy_and_names_the_fix() -> None:
    block = _block(FLAT, 4)  # K = 4 ranks
    with pytest.raises(RuntimeError, match=r"4 workers .* this run has 2 .* resume with 4 workers"):
        select_worker_entry(block, _node(2, 2), rank=0, world_size=4, policy="error")
    assert select_worker_entry(block, _node(2, 2), rank=0, world_size=4, policy="reset_residuals") is None
