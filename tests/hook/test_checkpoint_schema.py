"""A corrupt checkpoint fails at load, on one in-process rank, with one message naming the field.

Each case edits one field of a good rank state or gathered state (written by the hook itself) and
expects a ValueError whose message names that field the way it is reached in the file; the target
hook state must be untouched afterwards (nothing is restored before the whole state passed). Before
the schema check these gave a bare ``KeyError: 'step'``, a ``zip()`` length error, a ``TypeError`` for
a None block, or loaded (a negative step). The 4-rank launch of ``test_hierarchy.py`` shows that every
rank refuses a bad entry of one rank alike.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gmc import GMCConfig, GMCHookState, Simulator, gmc_hook

pytestmark = pytest.mark.usefixtures("single_rank_group")

Edit = Callable[[dict[str, Any]], None]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def _state(method: str = "gmc", train_steps: int = 0, **config: Any) -> tuple[GMCHookState, nn.Module]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if method == "gmc" else 0.0)
    state = GMCHookState.from_config(GMCConfig(method=method, density=0.5, **config))
    state.on_world_size_change = "reset_residuals"
    state.attach(model, optimizer)
    if train_steps:
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(state, gmc_hook)
        gen = torch.Generator().manual_seed(1)
        for _ in range(train_steps):
            ddp(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return state, model


def _two_rank_block() -> dict[str, Any]:
    """A gathered block of 2 ranks (rank 1's residual differs), from a trained rank's own block."""
    saved, _ = _state(train_steps=2)
    block = saved.gathered_state_dict()
    other = copy.deepcopy(block["per_rank_local"][0])
    for tensor in other["buffers"]["residual"].values():
        tensor.add_(1.0)
    return {**block, "world_size": 2, "per_rank_local": [block["per_rank_local"][0], other]}


def _set(path: tuple[Any, ...], value: Any) -> Edit:
    def edit(block: dict[str, Any]) -> None:
        target = block
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(*path: Any) -> Edit:
    def edit(block: dict[str, Any]) -> None:
        target = block
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def _reshape(*path: Any) -> Edit:
    def edit(block: dict[str, Any]) -> None:
        target = block
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = target[path[-1]].reshape(-1, 1)

    return edit


def _poison(*path: Any) -> Edit:
    def edit(block: dict[str, Any]) -> None:
        target = block
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = target[path[-1]].clone()
        target[path[-1]].view(-1)[0] = math.nan

    return edit


RESIDUAL_1 = ("per_rank_local", 1, "buffers", "residual")
GATHERED_CASES: dict[str, tuple[Edit, str]] = {
    "missing step": (_delete("step"), r"step is missing"),
    "None step": (_set(("step",), None), r"step is None \(NoneType\), expected an integer >= 0"),
    "negative step": (_set(("step",), -1), r"step is -1, expected an integer >= 0"),
    "float step": (_set(("step",), 2.5), r"step is 2\.5 \(float\), expected an integer"),
    "bool step": (_set(("step",), True), r"step is True \(bool\)"),
    "missing format": (_delete("format"), r"format is missing"),
    "wrong format number": (_set(("format",), 2), r"format is 2 \(int\): unsupported state format"),
    "other method": (
        _set(("method",), "dgc with topk"),
        r"method is 'dgc with topk': the checkpoint was written",
    ),
    "None shared block": (_set(("shared",), None), r"shared is None \(NoneType\), expected a dict"),
    "None buffer": (_set(("shared", "momentum"), None), r"shared\['momentum'\] is None"),
    "unknown buffer": (
        _set(("shared", "velocity"), {}),
        r"shared\['velocity'\] is a buffer that method 'gmc' does not keep",
    ),
    "missing buffer": (_delete(*RESIDUAL_1), r"per_rank_local\[1\]\.buffers\['residual'\] is missing"),
    "short per-rank list": (_delete("per_rank_local", 1), r"per_rank_local has 1 entries, world_size is 2"),
    "None per-rank entry": (_set(("per_rank_local", 1), None), r"per_rank_local\[1\] is None"),
    "wrong shape": (
        _reshape(*RESIDUAL_1, "0.weight"),
        r"per_rank_local\[1\]\.buffers\['residual'\]\['0\.weight'\] has shape \(16, 1\), "
        r"the model has \(4, 4\)",
    ),
    "missing parameter": (
        _delete(*RESIDUAL_1, "2.bias"),
        r"per_rank_local\[1\]\.buffers\['residual'\] does not match the model: "
        r"missing parameters \['2\.bias'\]",
    ),
    "unexpected parameter": (
        _set((*RESIDUAL_1, "3.weight"), torch.zeros(2)),
        r"per_rank_local\[1\]\.buffers\['residual'\] does not match the model: .*unexpected \['3\.weight'\]",
    ),
    "not a tensor": (
        _set((*RESIDUAL_1, "0.bias"), [0.0] * 4),
        r"\['0\.bias'\] is \[0\.0, 0\.0, 0\.0, 0\.0\] \(list\), expected a floating-point tensor",
    ),
    "integer tensor": (
        _set((*RESIDUAL_1, "0.bias"), torch.zeros(4, dtype=torch.int64)),
        r"\['0\.bias'\] is tensor.* expected a floating-point tensor",
    ),
    "non-finite residual": (
        _poison(*RESIDUAL_1, "2.weight"),
        r"per_rank_local\[1\]\.buffers\['residual'\]\['2\.weight'\] holds non-finite values",
    ),
    "non-finite momentum": (
        _poison("shared", "momentum", "0.weight"),
        r"shared\['momentum'\]\['0\.weight'\] holds",
    ),
    "LR history of another optimizer": (
        _set(("last_lrs",), [0.1, 0.1]),
        r"last_lrs has 2 learning rates, the optimizer has 1 param groups",
    ),
    "non-finite learning rate": (_set(("last_lrs",), [math.nan]), r"last_lrs\[0\] is nan"),
    "LR history of a wrong type": (_set(("last_lrs",), 0.1), r"last_lrs is 0\.1 \(float\)"),
    "missing traffic total": (
        _delete("stats", "bytes_sent_total"),
        r"stats\['bytes_sent_total'\] is missing",
    ),
    "negative traffic total": (
        _set(("stats", "rcc_bits_total"), -1.0),
        r"stats\['rcc_bits_total'\] is -1\.0",
    ),
    "bad per-rank totals": (
        _set(("per_rank_local", 1, "stats"), None),
        r"per_rank_local\[1\]\.stats is None",
    ),
    "zero world size": (_set(("world_size",), 0), r"world_size is 0, expected an integer >= 1"),
    "string world size": (_set(("world_size",), "2"), r"world_size is '2' \(str\)"),
    "unknown hierarchy": (_set(("topology",), {"hierarchy": "tree"}), r"topology\['hierarchy'\] is 'tree'"),
    "topology of another size": (
        _set(("topology",), {"hierarchy": "node", "num_nodes": 2, "ranks_per_node": 2}),
        r"topology is 2 nodes x 2 ranks, but world_size is 2",
    ),
    "training parameters of another shape": (
        _set(("per_rank_local", 0, "training_parameters"), {"0.weight": torch.zeros(2)}),
        r"per_rank_local\[0\]\.training_parameters does not match the model",
    ),
}


def _assert_untouched(state: GMCHookState) -> None:
    assert state.step == 0 and state.clock.last_lrs is None
    assert state.worker is not None
    assert all(torch.count_nonzero(t) == 0 for tensors in state.worker.tensors.values() for t in tensors)


@pytest.mark.parametrize("case", list(GATHERED_CASES))
def test_a_corrupt_gathered_state_names_the_field_and_restores_nothing(case: str) -> None:
    edit, pattern = GATHERED_CASES[case]
    block = _two_rank_block()
    edit(block)
    target, _ = _state()
    with pytest.raises(ValueError, match=r"^lightning_gmc checkpoint: ") as caught:
        target.load_state_dict(block)
    assert caught.match(pattern)
    _assert_untouched(target)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (_delete("local"), r"local is missing"),
        (_set(("local", "residual"), None), r"local\['residual'\] is None"),
        (_reshape("local", "residual", "2.weight"), r"local\['residual'\]\['2\.weight'\] has shape \(8, 1\)"),
        (_delete("step"), r"step is missing"),
    ],
)
def test_a_corrupt_rank_state_names_the_field(edit: Edit, pattern: str) -> None:
    saved, _ = _state(train_steps=2)
    rank_state = saved.state_dict()
    edit(rank_state)
    target, _ = _state()
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(rank_state)
    _assert_untouched(target)


def test_a_state_that_is_not_a_dict_is_named() -> None:
    target, _ = _state()
    with pytest.raises(ValueError, match=r"the GMC state is None \(NoneType\), expected a dict"):
        target.load_state_dict(None)  # type: ignore[arg-type]


def test_the_good_files_still_load() -> None:
    block = _two_rank_block()
    target, _ = _state()
    target.load_state_dict(block)  # another world size: reset_residuals
    assert target.step == 2
    saved, _ = _state(train_steps=2)
    again, _ = _state()
    again.load_state_dict(saved.state_dict())
    assert again.step == 2


# ------------------------------------------------------------ EF21's invariant h = mean_k h_k
def _ef21_block(compressor: str = "topk", wire_dtype: str = "fp32", steps: int = 3) -> dict[str, Any]:
    """A consistent 2-worker EF21 gathered block from the simulator (the hook's parameter names)."""
    model = _model()
    sim = Simulator(
        dict(model.named_parameters()),
        2,
        method="ef21",
        compressor=compressor,
        density=0.5,
        wire_dtype=wire_dtype,
    )
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        grads = [
            {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(2)
        ]
        sim.step(grads, sim.gradient_points(dict(model.named_parameters()), 0.1), 0.1)
    target, _ = _state("ef21", compressor=compressor, wire_dtype=wire_dtype)
    return {
        "format": 1,
        "method": target.method.describe(),
        "step": steps,
        "last_lrs": [0.1],
        "shared": sim.workers[0].state_dict("shared"),
        "stats": target.stats.state_dict(),
        "world_size": 2,
        "per_rank_local": [{"buffers": worker.state_dict("local")} for worker in sim.workers],
        "topology": {"hierarchy": "flat"},
    }


def test_an_ef21_checkpoint_whose_aggregate_is_not_the_mean_estimate_is_refused() -> None:
    block = _ef21_block()
    target, _ = _state("ef21")
    target.load_state_dict(copy.deepcopy(block))  # consistent: loads
    # what a reset that zeroed the estimates and kept the aggregate wrote
    for entry in block["per_rank_local"]:
        entry["buffers"]["estimate"]["0.weight"] = torch.zeros(4, 4)
    fresh, _ = _state("ef21")
    with pytest.raises(
        ValueError,
        match=r"shared\['aggregate'\]\['0\.weight'\] is not the mean of "
        r"per_rank_local\[\*\]\.buffers\['estimate'\]\['0\.weight'\] \(relative difference 1\b",
    ):
        fresh.load_state_dict(block)
    _assert_untouched(fresh)


def test_fp32_rounding_passes_the_invariant_check_and_a_larger_gap_does_not() -> None:
    block = _ef21_block()
    aggregate = block["shared"]["aggregate"]["2.weight"]
    largest = max(
        float(aggregate.norm()),
        *(float(e["buffers"]["estimate"]["2.weight"].norm()) for e in block["per_rank_local"]),
    )
    direction = torch.ones_like(aggregate) / aggregate.numel() ** 0.5
    # 1e-4 of the largest norm: beyond any fp32 drift of a real run (~1e-6 after 2,000 steps), yet accepted
    block["shared"]["aggregate"]["2.weight"] = aggregate + 1e-4 * largest * direction
    target, _ = _state("ef21")
    target.load_state_dict(copy.deepcopy(block))
    block["shared"]["aggregate"]["2.weight"] = aggregate + 3e-3 * largest * direction
    with pytest.raises(ValueError, match=r"shared\['aggregate'\]\['2\.weight'\] is not the mean"):
        _state("ef21")[0].load_state_dict(block)


def test_a_16_bit_wire_ef21_checkpoint_is_held_to_the_fp32_bound_too() -> None:
    # rbgs sums its bf16 values in fp32 in rank order and the owner of each element takes back what
    # the one rounding did not deliver: h = mean_k h_k holds to fp32 rounding, so the check applies.
    block = _ef21_block("rbgs", "bf16")
    target, _ = _state("ef21", compressor="rbgs", wire_dtype="bf16")
    target.load_state_dict(block)
    assert target.step == 3
    block["shared"]["aggregate"]["0.weight"] = block["shared"]["aggregate"]["0.weight"] * 1.01
    fresh, _ = _state("ef21", compressor="rbgs", wire_dtype="bf16")
    with pytest.raises(ValueError, match="is not the mean"):
        fresh.load_state_dict(block)
