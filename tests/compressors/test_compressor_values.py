"""Compressors are immutable values: equality and hashing, plan caching by value, payload ownership.

References: the value semantics of frozen dataclasses (``dataclasses.replace``, ``FrozenInstanceError``)
and, for CSER sending two messages with one compressor value, ``torch.optim.SGD`` with momentum on the
mean gradient (CSER with C1 = C2 = identity is synchronous momentum SGD, Xie et al. 2020).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_gmc import Simulator
from lightning_gmc.compressors import (
    COMPRESSORS,
    Identity,
    RandomDithering,
    TopK,
    TopKApprox,
    Workspace,
    build_compressor,
    scale_for_error_feedback,
)
from lightning_gmc.methods import BucketStep, GroupHyper, ParameterTable, WorkerState, build_method
from lightning_gmc.methods._common import with_density
from lightning_gmc.methods.cser import CSER


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_equal_options_give_equal_hashable_values(name: str) -> None:
    first, second = build_compressor(name), build_compressor(name)
    assert first is not second
    assert first == second and hash(first) == hash(second)
    assert len({first, second}) == 1
    scaled, scaled_again = scale_for_error_feedback(first), scale_for_error_feedback(second)
    assert scaled == scaled_again and hash(scaled) == hash(scaled_again)


def test_different_options_or_kinds_are_different_values() -> None:
    assert TopK(0.1) != TopK(0.2)
    assert TopK(0.1) != build_compressor("randk", density=0.1)  # same fields, other kind
    assert RandomDithering(levels=4) != RandomDithering(levels=4, block_size=64)
    # normalised options compare equal: "inf" and math.inf are the same norm
    assert RandomDithering(norm="inf") == RandomDithering(norm=float("inf"))  # type: ignore[arg-type]
    assert build_compressor("spherical_rc", variant="contractive") != build_compressor("spherical_rc")


def test_compressors_are_frozen_and_replace_validates() -> None:
    topk = TopK(0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        topk.density = 0.5  # type: ignore[misc]
    assert dataclasses.replace(topk, density=0.5) == TopK(0.5)
    assert topk.density == 0.1
    with pytest.raises(ValueError, match="density must be in"):
        dataclasses.replace(topk, density=1.5)
    contractive = dataclasses.replace(build_compressor("spherical_rc"), variant="contractive")
    assert not contractive.unbiased  # derived fields follow the options


def test_unknown_option_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['level'\].*levels.*norm.*block_size"):
        build_compressor("qsgd", level=4)


def test_with_density_is_replace_without_copies() -> None:
    approx = TopKApprox(0.01, sample_ratio=0.05)
    assert with_density(approx, 0.2, "test") == TopKApprox(0.2, sample_ratio=0.05)
    assert with_density(approx, 0.01, "test") == approx
    with pytest.raises(ValueError, match="has none"):
        with_density(RandomDithering(), 0.1, "test")


def _bucket(method_name: str = "gmc") -> tuple[WorkerState, tuple[int, ...]]:
    table = ParameterTable(("a", "b"), (torch.Size([6]), torch.Size([4])), (0, 0))
    method = build_method(method_name, Identity())
    return WorkerState(method, table, torch.device("cpu"), rank=0, seed=0), (0, 1)


def _step(worker: WorkerState, key: tuple[int, ...], t: int) -> BucketStep:
    grad = torch.zeros(10)
    return BucketStep(
        bucket=worker.bucket(key),
        grad=grad,
        out=grad,
        hypers=[GroupHyper(0.1, 0.1, 0.9, 0.0)],
        step=t,
        rng=worker.rng,
        world_size=1,
        read_params=lambda out: out.zero_(),
    )


def test_plans_are_cached_by_value_and_replace_gets_a_new_entry() -> None:
    worker, key = _bucket()
    bucket = worker.bucket(key)
    plan = bucket.plan(TopK(0.5))
    assert bucket.plan(TopK(0.5)) is plan  # an equal value, not the same object
    other = bucket.plan(dataclasses.replace(TopK(0.5), density=0.2))
    assert other is not plan
    assert other.payload[0].numel == 2 < plan.payload[0].numel == 5  # max(1, floor(0.2 * 6)) + 1


def test_messages_of_one_step_own_their_payloads_and_reuse_them_next_step() -> None:
    worker, key = _bucket()
    pointers = []
    for t in range(3):
        step = _step(worker, key, t)
        x1, x2 = torch.arange(10.0) + t, -torch.arange(10.0) - t
        # one compressor value for both messages, as CSER's C1 and C2 when they are equal
        first = step.compress(Identity(), x1)
        second = step.compress(Identity(), x2, stream_offset=1)
        assert first.plan is second.plan
        assert torch.equal(first.payload.tensors["values"], x1)
        assert torch.equal(second.payload.tensors["values"], x2)
        pointers.append(tuple(m.payload.tensors["values"].data_ptr() for m in (first, second)))
    assert pointers[0][0] != pointers[0][1]
    assert pointers[1] == pointers[0] == pointers[2]  # no payload allocation after the first step


def test_workspace_allocates_once_and_reallocates_on_a_new_size() -> None:
    workspace = Workspace()
    buf = workspace.tensor("x", 8, torch.float32, torch.device("cpu"))
    assert workspace.tensor("x", 8, torch.float32, torch.device("cpu")) is buf
    assert workspace.tensor("x", 9, torch.float32, torch.device("cpu")).numel() == 9
    calls: list[int] = []

    def build() -> torch.Tensor:
        calls.append(1)
        return torch.ones(3)

    cpu = torch.device("cpu")
    assert workspace.constant("c", cpu, build) is workspace.constant("c", cpu, build)
    assert calls == [1]


def test_cser_two_messages_with_one_identity_value_is_sgd_momentum_on_the_mean() -> None:
    shapes = {"a": (3, 4), "b": (5,)}
    sim = Simulator(shapes, num_workers=2, method="cser", compressor="none", momentum=0.9, reset_interval=1)
    assert isinstance(sim.method, CSER) and sim.method.reset_compressor is sim.method.compressor  # no copy
    gen = torch.Generator().manual_seed(3)
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    optimizer = torch.optim.SGD(list(reference.values()), lr=0.1, momentum=0.9)
    for lr in (0.1, 0.08, 0.05, 0.05):  # every step is a reset step: both messages in flight
        grads = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(2)]
        directions = sim.step(grads, sim.gradient_points(params, lr), lr)
        params = {k: params[k] - lr * directions[0][k] for k in params}
        for group in optimizer.param_groups:
            group["lr"] = lr
        for k, p in reference.items():
            p.grad = (grads[0][k] + grads[1][k]) / 2
        optimizer.step()
    for k in shapes:
        torch.testing.assert_close(params[k], reference[k].detach(), rtol=1e-5, atol=1e-6)
