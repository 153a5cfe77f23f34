"""The per-step hot loops' shortcuts against the plain path they replace.

* The identity's payload built in place (``Compressor.sends_input``) gives the same bits, signed
  zeros included, as compressing a copy and subtracting it from the residual (an identity that
  does not offer it), for every method, in the simulator with K = 3.
* The detached point by data swap is ``w - s * residual`` exactly, keeps the same parameter
  objects (DDP's and autograd's hooks stay attached), and leaves ``w`` bit for bit.
* The hook hands DDP the method's direction buffer: after backward the gradients are GMC's momentum.
* With the identity, the message is the buffer the method staged it in, and the mean is decoded
  back into that buffer: no copy on either side.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lightning_gmc
from lightning_gmc import Simulator
from lightning_gmc.compressors import Identity
from lightning_gmc.methods import Message, build_method


@dataclasses.dataclass(frozen=True)
class _CopyingIdentity(Identity):
    """The identity without the in-place shortcut: compress copies, subtract_own zeroes."""

    sends_input: ClassVar[bool] = False


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


METHOD_OPTIONS = {
    "gmc": {"momentum_lr_convention": "cur"},
    "dgc": {"momentum_masking": False},
    "ef_server_momentum": {},
    "gmc_lr_inside": {},
    "def_a": {"detach": 0.3, "evaluation": "x_t"},
    "cser": {"reset_interval": 2},
    "dmsgd": {},
    "ef": {},
    "ef21": {},
}


@pytest.mark.parametrize("name", sorted(METHOD_OPTIONS))
def test_identity_in_place_equals_the_copying_path(name: str) -> None:
    shapes = {"a": (5, 3), "b": (7,)}
    runs = []
    for compressor in (Identity(), _CopyingIdentity()):
        method = build_method(name, compressor, **METHOD_OPTIONS[name])
        hyper = {"momentum": 0.9, "weight_decay": 0.01} if method.takes_over_optimizer else {}
        sim = Simulator(shapes, num_workers=3, method=method, **hyper)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(0)
        w = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        out = []
        for t, lr in enumerate([0.1, 0.1, 0.05, 0.02, 0.02]):
            points = sim.gradient_points(w, lr)
            grads = []
            for _ in range(3):
                g = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
                g["b"][t % 7] = -0.0  # signed zeros must survive as the copying path leaves them
                grads.append(g)
            directions = sim.step(grads, points, lr)
            out.append([_bits(d[k]) for d in directions for k in shapes])
            w = {k: w[k] - lr * directions[0][k] for k in shapes}
        runs.append(out)
    for step_new, step_old in zip(*runs, strict=True):
        for new, old in zip(step_new, step_old, strict=True):
            assert torch.equal(new, old)


def _attached(detach: float) -> tuple[nn.Module, torch.optim.SGD, lightning_gmc.GMCHookState]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method = build_method("gmc", lightning_gmc.build_compressor("rbgs", density=0.5), detach=detach)
    state = lightning_gmc.GMCHookState(method)
    state.attach(model, opt)
    return model, opt, state


def test_detached_point_is_exact_and_restores_the_same_tensors() -> None:
    model, _, state = _attached(detach=0.5)
    assert state.worker is not None
    gen = torch.Generator().manual_seed(1)
    for residual in state.worker.tensors["residual"]:
        residual.copy_(torch.randn(residual.shape, generator=gen))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    storage = [p.data_ptr() for p in params]
    x = torch.randn(6, 4, generator=gen)
    s = 0.5 * 0.1  # detach * lr
    with state.detached_point():
        assert list(model.parameters()) == params  # the same Parameter objects
        for p, w, r in zip(params, before, state.worker.tensors["residual"], strict=True):
            assert torch.equal(p, w.clone().add_(r.view_as(w), alpha=-s))
        assert state.swap is not None
        for kept, w in zip(state.swap.training_values(), before, strict=True):
            assert torch.equal(kept, w)
        model(x).square().sum().backward()
        shifted = [p.detach().clone() for p in params]
    for p, w, ptr in zip(params, before, storage, strict=True):
        assert torch.equal(p, w) and p.data_ptr() == ptr
    # the gradient is the one at the shifted point (a fresh model there)
    reference = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        for q, v in zip(reference.parameters(), shifted, strict=True):
            q.copy_(v)
    reference(x).square().sum().backward()
    for p, q in zip(params, reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad)


@pytest.mark.usefixtures("single_rank_group")
def test_the_hook_hands_ddp_the_momentum_as_gradient() -> None:
    model, opt, state = _attached(detach=0.0)
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        opt.zero_grad()
        ddp(torch.randn(5, 4, generator=gen)).square().sum().backward()
        assert state.worker is not None
        for p, m in zip(model.parameters(), state.worker.tensors["momentum"], strict=True):
            assert p.grad is not None
            assert torch.equal(p.grad.reshape(-1), m)
            assert p.grad.data_ptr() != m.data_ptr()  # DDP's copy, not the state buffer
        opt.step()


# Methods whose identity message is built in a buffer the mean is then decoded into.
IN_PLACE = ("def_a", "dgc", "dmsgd", "ef", "ef_server_momentum", "gmc", "gmc_lr_inside")


@pytest.mark.parametrize("name", IN_PLACE)
def test_identity_sends_its_staged_buffer_and_decodes_the_mean_into_it(name: str) -> None:
    method = build_method(name, Identity(), **METHOD_OPTIONS[name])
    hyper = {"momentum": 0.9} if method.takes_over_optimizer else {}
    sim = Simulator({"a": (6,), "b": (3,)}, num_workers=2, method=method, **hyper)  # type: ignore[arg-type]
    sent: list[list[Message]] = []
    means: list[list[torch.Tensor]] = []
    start = sim.exchange.start

    def recording_start(messages, buckets, step, **kw):  # type: ignore[no-untyped-def]
        sent[:] = [list(m) for m in messages]
        means[:] = start(messages, buckets, step, **kw).wait()
        done: torch.futures.Future[list[list[torch.Tensor]]] = torch.futures.Future()
        done.set_result(means)
        return done

    sim.exchange.start = recording_start  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(3)
    w = {"a": torch.randn(6, generator=gen), "b": torch.randn(3, generator=gen)}
    for _ in range(2):
        grads = [{k: torch.randn(v.shape, generator=gen) for k, v in w.items()} for _ in range(2)]
        sim.step(grads, sim.gradient_points(w, 0.1), 0.1)
        for worker, messages in enumerate(sent):
            (message,) = messages
            values = message.payload.tensors["values"]
            assert message.decode_into is not None
            assert values.data_ptr() == message.decode_into.data_ptr(), worker  # sent without a copy
            assert means[worker][0].data_ptr() == message.decode_into.data_ptr(), worker  # mean in place
