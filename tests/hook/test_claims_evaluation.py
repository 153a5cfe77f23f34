"""Evaluation models through the hook on one in-process rank (plain DDP + ``gmc_hook``).

README: "Methods whose evaluation model differs from the training parameters (CSER, DEF-A's option)
store the evaluation model as the checkpoint weights and every rank's own parameters in the GMC
block." Checked against the definitions written out by hand (docs/algorithms.md 3.9): DEF-A evaluates
``w - (1/K) sum_k e_k`` (residuals in parameter units), CSER the ranks' average; leaving the block
restores the training parameters bit for bit, and a checkpoint written inside the block (as
Lightning does during validation) still carries the training parameters.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gmc import GMCHookState, build_compressor, build_method, gmc_hook

pytestmark = pytest.mark.usefixtures("single_rank_group")


def _train(method_name: str, steps: int = 3, **options: object) -> tuple[nn.Module, GMCHookState]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = GMCHookState(build_method(method_name, build_compressor("rbgs", density=0.25), **options))
    state.attach(model, optimizer)
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(state, gmc_hook)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        with state.detached_point():
            nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, state


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_def_a_evaluates_params_minus_the_mean_residual_and_restores() -> None:
    model, state = _train("def_a")
    trained = _params(model)
    residual = state.state_dict()["local"]["residual"]
    assert any(t.abs().sum() > 0 for t in residual.values())
    with state.evaluation_point():
        evaluated = _params(model)
        saved = state.gathered_state_dict()  # a checkpoint written during validation
    for name, w in trained.items():
        torch.testing.assert_close(evaluated[name], w - residual[name], rtol=0, atol=1e-7, msg=name)
        assert torch.equal(_params(model)[name], w), name  # restored bit for bit
        # the checkpoint's GMC block carries the training parameters, not the evaluation model
        assert torch.equal(saved["per_rank_local"][0]["training_parameters"][name], w), name


def test_def_a_without_the_virtual_iterate_evaluates_the_training_parameters() -> None:
    model, state = _train("def_a", evaluation="x_t")
    trained = _params(model)
    with state.evaluation_point():
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), trained[name]), name
    assert "training_parameters" not in state.gathered_state_dict()["per_rank_local"][0]


def test_cser_evaluates_the_mean_of_the_ranks_models() -> None:
    model, state = _train("cser", steps=3, reset_interval=2)
    trained = _params(model)
    with state.evaluation_point():
        evaluated = _params(model)
    for name, w in trained.items():  # the mean over one rank is its own model
        torch.testing.assert_close(evaluated[name], w, rtol=0, atol=0, msg=name)
        assert torch.equal(_params(model)[name], w), name
