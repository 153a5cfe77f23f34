"""A step whose fp16 wire overflows is refused without a trace (docs/algorithms.md 3.12).

The reference is the same run without the refused step: after the overflow is caught and training
goes on, parameters, the optimizer's state, the GMC state (residuals, momentum, estimates, the step
counter) and the traffic totals must equal, bit for bit, a run that never attempted that step. Plain
DDP on a one-rank gloo group (the hook's own path; ``tests/distributed`` runs 2 ranks), and the
simulator with K = 2.

The overflow is planted in the first layer's gradient only (a tensor hook), so it is the *last*
bucket of the step that overflows: the buckets before it were already exchanged and decoded, and the
refusal must put their state back too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lightning_gmc
from lightning_gmc import Simulator
from lightning_gmc.compressors import build_compressor
from lightning_gmc.transport import WireOverflow

STEPS = 6
REFUSED = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))


def _train(method: str, compressor: str, refuse: bool, optimizer: str = "sgd") -> dict[str, Any]:
    model = _model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.1)  # three buckets after the rebuild
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    built = lightning_gmc.build_method(method, build_compressor(compressor, density=0.1, wire_dtype="fp16"))
    state = lightning_gmc.GMCHookState(built)
    state.attach(model, opt)
    ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
    first_layer = model[0].weight
    blow_up = {"on": False}
    first_layer.register_hook(lambda grad: grad * 1e9 if blow_up["on"] else grad)
    gen = torch.Generator().manual_seed(1)
    errors = []
    metrics = []
    for step in range(STEPS):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        if step == REFUSED:
            if not refuse:
                continue
            blow_up["on"] = True
            with pytest.raises(RuntimeError, match="WireOverflow.*overflowed fp16.*refused") as caught:
                nn.functional.cross_entropy(ddp(x), y).backward()
            errors.append(str(caught.value))
            blow_up["on"] = False
            opt.zero_grad()
            continue
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        metrics.append(state.take_metrics())
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "optimizer": opt.state_dict()["state"],
        "gmc": state.state_dict(),
        "step": state.step,
        "metrics": metrics,
        "errors": errors,
    }


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    ("method", "compressor", "optimizer"),
    [
        ("gmc", "topk", "sgd"),  # momentum decoded into by earlier buckets
        ("gmc", "none", "sgd"),  # the identity: u staged in the momentum buffer
        ("dgc", "rbgs", "sgd"),  # local momentum and residual
        ("ef21", "topk", "adamw"),  # estimates and the shared aggregate, any optimizer
    ],
)
def test_a_refused_step_leaves_every_state_as_before_it(
    single_rank_group: None, method: str, compressor: str, optimizer: str
) -> None:
    refused = _train(method, compressor, refuse=True, optimizer=optimizer)
    reference = _train(method, compressor, refuse=False, optimizer=optimizer)
    assert len(refused["errors"]) == 1 and "at step 3" in refused["errors"][0]
    assert "bucket 0" not in refused["errors"][0]  # the first layer sits in the step's last bucket
    assert refused["step"] == reference["step"] == STEPS - 1
    _assert_equal(refused["params"], reference["params"], "params")
    _assert_equal(refused["optimizer"], reference["optimizer"], "optimizer")
    _assert_equal(refused["gmc"], reference["gmc"], "gmc")
    _assert_equal(refused["metrics"], reference["metrics"], "metrics")


SHAPES = {"a": (40,), "b": (15,)}


@pytest.mark.parametrize("overflowing", ["one worker", "every worker"])
@pytest.mark.parametrize("compressor", ["none", "rbgs", "topk", "topk_shared"])
def test_the_simulator_refuses_a_step_on_every_worker_alike(compressor: str, overflowing: str) -> None:
    def run(refuse: bool) -> Simulator:
        sim = Simulator(SHAPES, 2, compressor=compressor, density=0.1, momentum=0.9, wire_dtype="fp16")
        gen = torch.Generator().manual_seed(2)
        params = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
        for step in range(4):
            grads = [{n: torch.randn(shape, generator=gen) for n, shape in SHAPES.items()} for _ in range(2)]
            if step == 2:
                if not refuse:
                    continue
                # 40000 fits fp16, two of them (80000) do not: a summing route's sum overflows (top-k's
                # all-gather adds in fp32, so there every value is out of range); 1e5 overflows alone
                summed = compressor != "topk"
                big = 4.0e4 if overflowing == "every worker" and summed else 1.0e5
                for k in range(2 if overflowing == "every worker" else 1):
                    grads[k] = {name: torch.full(shape, big) for name, shape in SHAPES.items()}
                before = sim.stats.snapshot()
                with pytest.raises(WireOverflow, match="overflowed fp16.*refused.*'bf16'"):
                    sim.step(grads, sim.gradient_points(params, 0.1), 0.1)
                assert sim.stats.snapshot() == before
                continue
            sim.step(grads, sim.gradient_points(params, 0.1), 0.1)
        return sim

    refused, reference = run(True), run(False)
    assert refused.step_index == reference.step_index == 3
    for mine, theirs in zip(refused.workers, reference.workers, strict=True):
        _assert_equal(mine.state_dict(), theirs.state_dict())
    _assert_equal(refused.stats.state_dict(), reference.stats.state_dict())
