"""The dense route's residual is zero from step to step: error feedback then neither adds it nor
zeroes it again (two of the staged sum's three passes). The reference is the same run with that
shortcut switched off (``BucketState.holds_zeros`` always False), which adds onto the zeros.

Any in-place write to the residual in between (here through the worker's per-parameter views, as a
checkpoint's load writes) must send the full sum again."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lightning_gmc.methods.base as method_base
from lightning_gmc import Simulator
from lightning_gmc.methods import BucketState

PARAMS = {"a": torch.Size([40]), "b": torch.Size([7])}
WORKERS = 3
CASES = [
    {"method": "gmc", "compressor": "none"},  # x = g + beta m, staged in the momentum buffer
    {"method": "ef", "compressor": "none", "momentum": None},  # x = g, staged in the gradient
    {"method": "gmc", "compressor": "none", "weight_decay": 1e-2},  # three terms: no shortcut
]


def _run(case: dict[str, Any], steps: int, poke_at: int | None = None) -> list[dict[str, torch.Tensor]]:
    options = {"momentum": 0.9, **case}
    sim = Simulator(PARAMS, num_workers=WORKERS, **options)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(5)
    w = {name: torch.randn(shape, generator=gen) for name, shape in PARAMS.items()}
    out = []
    for step in range(steps):
        if step == poke_at:  # a write into worker 1's residual between two steps
            sim.workers[1].tensors["residual"][0].add_(0.25)
        points = sim.gradient_points(w, lr=0.1)
        grads = [{name: torch.randn(shape, generator=gen) for name, shape in PARAMS.items()} for _ in points]
        direction = sim.step(grads, points, lr=0.1)[0]
        w = {name: w[name] - 0.1 * direction[name] for name in w}
        out.append(w)
    return out


def _counting_shortcuts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    taken: list[bool] = []
    original = method_base.stage_onto_zero

    def counted(*args: Any) -> bool:
        result = original(*args)
        taken.append(result)
        return result

    monkeypatch.setattr(method_base, "stage_onto_zero", counted)
    return taken


@pytest.mark.parametrize("case", CASES, ids=["gmc", "ef", "gmc-weight-decay"])
@pytest.mark.parametrize("poke_at", [None, 3])
def test_the_shortcut_equals_adding_onto_the_zeros(
    case: dict[str, Any], poke_at: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        taken = _counting_shortcuts(patch)
        fast = _run(case, steps=6, poke_at=poke_at)
    # the first step's residual was never zeroed; every later one is, but for the poked worker
    expected_taken = "weight_decay" not in case
    assert any(taken) == expected_taken
    with monkeypatch.context() as patch:
        patch.setattr(BucketState, "holds_zeros", lambda self, buffer: False)
        reference = _run(case, steps=6, poke_at=poke_at)
    for step, (got, want) in enumerate(zip(fast, reference, strict=True)):
        for name in got:
            assert torch.equal(got[name], want[name]), (step, name)


def test_a_write_to_the_residual_ends_the_shortcut() -> None:
    sim = Simulator(PARAMS, num_workers=1, compressor="none", momentum=0.9)
    points = sim.gradient_points({name: torch.zeros(shape) for name, shape in PARAMS.items()}, lr=0.1)
    grads = [{name: torch.ones(shape) for name, shape in PARAMS.items()}]
    sim.step(grads, points, lr=0.1)
    bucket = next(iter(sim.workers[0]._buckets.values()))
    residual = bucket.buffers["residual"]
    assert bucket.holds_zeros(residual)
    sim.workers[0].tensors["residual"][1][0] = 0.0  # any in-place write, even of a zero
    assert not bucket.holds_zeros(residual)
    # m_1 = g + 0.9 m_0 = 1 + 0.9 * 1 after a second step that took the full sum again
    direction = sim.step(grads, points, lr=0.1)[0]
    assert torch.equal(direction["a"], torch.full((40,), 1.9))
    assert bucket.holds_zeros(residual)
