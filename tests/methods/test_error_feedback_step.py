"""``BucketStep.send_error_feedback`` against its definition written out, and CSER's identity path.

* ``x = residual + terms`` (a tensor, a :class:`Term` with a per-group coefficient, the weight-decay
  term), ``C(x)`` sent and ``x - C(x)`` kept: with top-k the payload and the new residual add up to
  ``x`` and split it at the selected coordinates; with the identity ``x`` is built in the staging
  buffer, sent without a copy, the mean decoded there, and the residual is zero.
* A term whose coefficient is zero in a group is left out there (a ``-0.0`` in the residual stays
  ``-0.0``, which adding ``0 * t`` would turn into ``+0.0``), and its tensor is not even read.
* CSER with ``C1 = I`` leaves nothing behind, so its resets send zeros whatever ``C2`` is: it is
  ``torch.optim.SGD`` with momentum on the mean gradient (Xie et al. 2020), also across reset steps.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gmc import Simulator
from lightning_gmc.compressors import Identity, build_compressor
from lightning_gmc.methods import BucketStep, GroupHyper, ParameterTable, Term, WorkerState, build_method

NUMELS = (6, 4)  # two parameters, one per param group
HYPERS = [
    GroupHyper(lr=0.1, prev_lr=0.1, momentum=0.9, weight_decay=0.1),
    GroupHyper(lr=0.1, prev_lr=0.1, momentum=0.0, weight_decay=0.0),
]


def _step(compressor_name: str, params: torch.Tensor) -> BucketStep:
    compressor = build_compressor(compressor_name, density=0.5)
    table = ParameterTable(
        names=("a", "b"), shapes=tuple(torch.Size([n]) for n in NUMELS), groups=(0, 1)
    )
    worker = WorkerState(build_method("ef", compressor), table, torch.device("cpu"), rank=0, seed=0)
    bucket = worker.bucket((0, 1))
    grad = torch.zeros(sum(NUMELS))
    return BucketStep(
        bucket=bucket,
        grad=grad,
        out=grad,
        hypers=HYPERS,
        step=0,
        rng=worker.rng,
        world_size=1,
        read_params=lambda out: out.copy_(params),
    )


def _vectors() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(sum(NUMELS), generator=gen) for _ in range(4))


def _expected(residual: torch.Tensor, g: torch.Tensor, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``residual + g + beta * m + wd * w`` per group, in float64 (group 1 has beta = wd = 0)."""
    x = residual.double() + g.double()
    x[:6] += 0.9 * m[:6].double() + 0.1 * w[:6].double()
    return x


def test_topk_sends_c_of_x_and_keeps_the_rest() -> None:
    residual0, g, m, w = _vectors()
    step = _step("topk", w)
    compressor = build_compressor("topk", density=0.5)
    residual = step.buffer("residual")
    residual.copy_(residual0)
    momentum = Term(m, lambda hyper: hyper.momentum)
    message = step.send_error_feedback(
        compressor, residual, g, momentum, step.weight_decay(), staging=step.grad, decode_into=None
    )
    sent = torch.zeros_like(residual)
    compressor.decompress_add(message.payload, message.plan, sent)
    x = _expected(residual0, g, m, w)
    torch.testing.assert_close((sent + residual).double(), x, rtol=1e-6, atol=1e-6)
    assert int((sent != 0).sum()) == 3 + 2  # half of each parameter
    assert torch.all((sent == 0) | (residual == 0))  # C(x) and x - C(x) split x
    assert message.decode_into is None


def test_identity_builds_x_in_the_staging_buffer_and_zeroes_the_residual() -> None:
    residual0, g, m, w = _vectors()
    step = _step("none", w)
    residual = step.buffer("residual")
    residual.copy_(residual0)
    staging = torch.full_like(residual, float("nan"))  # every element must be written
    momentum = Term(m, lambda hyper: hyper.momentum)
    message = step.send_error_feedback(
        Identity(), residual, g, momentum, step.weight_decay(), staging=staging
    )
    values = message.payload.tensors["values"]
    assert values.data_ptr() == staging.data_ptr()  # sent without a copy
    assert message.decode_into is staging  # the mean comes back into it
    assert torch.equal(residual, torch.zeros_like(residual))
    torch.testing.assert_close(staging.double(), _expected(residual0, g, m, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compressor", ["topk", "none"])
def test_a_zero_coefficient_leaves_its_term_out_unread(compressor: str) -> None:
    residual0, _, _, w = _vectors()
    residual0[7] = -0.0  # adding 0 * t would make it +0.0
    step = _step(compressor, w)
    residual = step.buffer("residual")
    residual.copy_(residual0)

    def unread() -> torch.Tensor:
        raise AssertionError("a term whose coefficient is zero in every group was read")

    staging = torch.empty_like(residual)
    message = step.send_error_feedback(
        build_compressor(compressor, density=1.0), residual, Term(unread, 0.0), staging=staging
    )
    sent = torch.zeros_like(residual)
    message.compressor.decompress_add(message.payload, message.plan, sent)
    x = staging if compressor == "none" else sent + residual  # top-k at density 1 sends all of x
    assert torch.equal(x, residual0)
    if compressor == "none":
        assert torch.signbit(staging[7])


def test_the_last_term_may_read_the_staging_buffer() -> None:
    residual0, g, m, w = _vectors()
    step = _step("none", w)
    residual = step.buffer("residual")
    residual.copy_(residual0)
    staging = m.clone()  # GMC's u = ... + beta m written over m
    step.send_error_feedback(
        Identity(), residual, g, Term(staging, lambda hyper: hyper.momentum), staging=staging
    )
    expected = residual0.double() + g.double()
    expected[:6] += 0.9 * m[:6].double()
    torch.testing.assert_close(staging.double(), expected, rtol=1e-6, atol=1e-6)


def test_cser_with_identity_c1_is_sgd_momentum_on_the_mean_across_resets() -> None:
    shapes = {"a": (3, 4), "b": (5,)}
    sim = Simulator(
        shapes,
        num_workers=2,
        method="cser",
        compressor="none",
        momentum=0.9,
        weight_decay=0.01,
        reset_compressor="topk",
        reset_density=0.5,
        reset_interval=2,
    )
    gen = torch.Generator().manual_seed(5)
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    optimizer = torch.optim.SGD(list(reference.values()), lr=0.1, momentum=0.9, weight_decay=0.01)
    for lr in (0.1, 0.08, 0.05, 0.05, 0.03):  # steps 2 and 4 reset
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
    for k in range(2):
        assert all(float(t.abs().max()) == 0.0 for t in sim.residual(k).values())
