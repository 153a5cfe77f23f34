"""``method="ef"`` in one process: the update rule against a hand-written float64 reference, every
compressor, the optimizer left alone, and the errors that point SGD-only methods' users to it.

Reference (``docs/algorithms.md`` 2.10), per worker k and step t::

    p_k = e_k + g_k;  e_k <- p_k - C(p_k);  gradient handed to the optimizer = (1/K) sum_k C(p_k)
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from reference import RBGS, Compressor, Problem, TopK, ef, ef21
from torch import nn

import lightning_gmc
from lightning_gmc import GMCConfig, GMCHookState, GMCStrategy, Simulator
from lightning_gmc.methods import ErrorFeedback

SHAPES = {"a": (2, 3), "b": (4,)}
K = 2
STEPS = 5


def _gradients(seed: int = 0) -> list[list[dict[str, torch.Tensor]]]:
    """Per step and worker, an arbitrary float64 gradient per parameter (EF does not look at w)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in SHAPES.items()}
            for _ in range(K)
        ]
        for _ in range(STEPS)
    ]


def _problem(grads: list[list[dict[str, torch.Tensor]]]) -> Problem:
    """The given float64 gradients per step and worker, wherever the model is."""

    def gradient(k: int, w: torch.Tensor, t: int) -> torch.Tensor:
        return torch.cat([grads[t][k][name].reshape(-1) for name in SHAPES])

    d = sum(math.prod(shape) for shape in SHAPES.values())
    return Problem(SHAPES, torch.zeros(d, dtype=torch.float64), gradient, K)


def _ef_by_hand(
    compress: Compressor, grads: list[list[dict[str, torch.Tensor]]]
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Per step the aggregated gradient, and the final residual of each worker (float64,
    ``reference.ef``; the model does not move, EF does not look at it)."""
    problem = _problem(grads)
    run = ef(problem, STEPS, compress, lambda direction, t: problem.w0)
    return [problem.split(g) for g in run.directions], [problem.split(e) for e in run.residual]


def _ef21_by_hand(
    compress: Compressor, grads: list[list[dict[str, torch.Tensor]]]
) -> list[dict[str, torch.Tensor]]:
    """EF21 from zero estimates (``reference.ef21``): per step the aggregate ``h`` the optimizer
    steps on."""
    problem = _problem(grads)
    run = ef21(problem, STEPS, compress, lambda direction, t: problem.w0)
    return [problem.split(h) for h in run.directions]


def _simulate(
    compressor: str, density: float, seed: int = 0, method: str = "ef"
) -> tuple[list[dict[str, torch.Tensor]], Simulator]:
    grads = _gradients()
    sim = Simulator(
        {name: torch.zeros(shape) for name, shape in SHAPES.items()},
        num_workers=K,
        method=method,
        compressor=compressor,
        density=density,
        seed=seed,
    )
    means = []
    w = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for t in range(STEPS):
        points = sim.gradient_points(w, lr=0.1)
        directions = sim.step([{n: g.float() for n, g in grads[t][k].items()} for k in range(K)], points, 0.1)
        for other in directions[1:]:
            for name in SHAPES:
                assert torch.equal(other[name], directions[0][name])
        means.append(directions[0])
    return means, sim


@pytest.mark.parametrize(
    ("compressor", "compress"),
    [("topk", TopK(0.34)), ("rbgs", RBGS(0.34, seed=7))],
    ids=["topk", "rbgs"],
)
def test_ef_steps_equal_the_hand_written_rule(compressor: str, compress: Compressor) -> None:
    means, sim = _simulate(compressor, 0.34, seed=7)
    expected_means, expected_residuals = _ef_by_hand(compress, _gradients())
    for t in range(STEPS):
        for name in SHAPES:
            torch.testing.assert_close(means[t][name].double(), expected_means[t][name], rtol=1e-6, atol=1e-6)
    for k in range(K):
        for name, shape in SHAPES.items():
            actual = sim.residual(k)[name].double().view(shape)
            torch.testing.assert_close(actual, expected_residuals[k][name], rtol=1e-6, atol=1e-6)
    # top-k keeps 2 of a's 6 and 1 of b's 4 coordinates per worker: the mean has at most K times that
    assert int(torch.count_nonzero(means[0]["a"])) <= 2 * K


@pytest.mark.parametrize(
    ("compressor", "compress"),
    [("topk", TopK(0.34)), ("rbgs", RBGS(0.34, seed=7))],
    ids=["topk", "rbgs"],
)
def test_ef21_steps_equal_the_hand_written_rule(compressor: str, compress: Compressor) -> None:
    aggregates, sim = _simulate(compressor, 0.34, seed=7, method="ef21")
    expected = _ef21_by_hand(compress, _gradients())
    for t in range(STEPS):
        for name in SHAPES:
            torch.testing.assert_close(aggregates[t][name].double(), expected[t][name], rtol=1e-5, atol=1e-5)
    # the aggregate is every worker's estimate averaged, and it is shared (saved once)
    for name, shape in SHAPES.items():
        estimates = [sim.workers[k].state_dict("local")["estimate"][name] for k in range(K)]
        shared = sim.workers[0].state_dict("shared")["aggregate"][name]
        torch.testing.assert_close(shared.view(shape), (estimates[0] + estimates[1]).view(shape) / K)


@pytest.mark.parametrize("compressor", sorted(lightning_gmc.COMPRESSORS))
def test_every_compressor_keeps_what_it_did_not_send(compressor: str) -> None:
    # For any compressor: sum_k e_k(t+1) = sum_k (e_k(t) + g_k(t)) - K * mean_t, i.e. nothing is lost.
    means, sim = _simulate(compressor, 0.34)
    grads = _gradients()
    for name, shape in SHAPES.items():
        kept = sum(sim.residual(k)[name].double().view(shape) for k in range(K))
        fed = sum(grads[t][k][name] for t in range(STEPS) for k in range(K))
        sent = K * sum(means[t][name].double() for t in range(STEPS))
        torch.testing.assert_close(kept, fed - sent, rtol=1e-5, atol=1e-5)
        assert all(torch.isfinite(means[t][name]).all() for t in range(STEPS))


def test_unbiased_compressors_are_scaled_as_for_every_error_feedback_method() -> None:
    ef = GMCStrategy(method="ef", compressor="qsgd").gmc_method.compressor
    assert ef == GMCStrategy(compressor="qsgd").gmc_method.compressor
    assert ef != GMCStrategy(method="ef", compressor="qsgd", ef_scaling=False).gmc_method.compressor
    assert "scaled by 1/(1+omega)" in ef.describe()


def test_simulator_with_adamw_applied_by_the_caller_equals_adamw_on_the_mean_gradient() -> None:
    model = nn.Linear(3, 2)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    sim = Simulator(dict(model.named_parameters()), num_workers=K, method="ef", compressor="none")
    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1) for m in (model, reference)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        per_worker = [{name: torch.randn(s, generator=gen) for name, s in shapes.items()} for _ in range(K)]
        points = sim.gradient_points(dict(model.named_parameters()), lr=0.01)
        direction = sim.step(per_worker, points, lr=0.01)[0]
        for name, p in model.named_parameters():
            p.grad = direction[name]
        for name, p in reference.named_parameters():
            p.grad = (per_worker[0][name] + per_worker[1][name]) / K
        for optimizer in optimizers:
            optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------- optimizer
def test_ef_leaves_any_optimizer_and_its_state_dict_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    groups = [
        {"params": model[0].parameters(), "weight_decay": 0.1, "lr": 1e-3},
        {"params": model[1].parameters()},
    ]
    for optimizer in (
        torch.optim.AdamW(groups, lr=2e-3, weight_decay=0.05, betas=(0.8, 0.99)),
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        torch.optim.Adagrad(model.parameters(), lr=0.1),
    ):
        before = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        saved_before = optimizer.state_dict()["param_groups"]
        state = GMCHookState.from_config(GMCConfig(method="ef", compressor="topk", density=0.5))
        state.attach(model, optimizer)
        assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == before
        assert optimizer.state_dict()["param_groups"] == saved_before
        hypers = state.begin_step()
        assert all((h.momentum, h.weight_decay) == (0.0, 0.0) for h in hypers)  # the optimizer's job
        assert state.binding.user_groups[0]["weight_decay"] == before[0]["weight_decay"]
        # checkpoints keep the residual only; the optimizer's own state is Lightning's to save
        saved = state.state_dict()
        assert set(saved["local"]) == {"residual"} and saved["shared"] == {}
        state.end_step()


def test_momentum_taking_methods_point_adam_users_to_ef() -> None:
    model = nn.Linear(3, 2)
    for method in ("gmc", "dgc", "def_a"):
        state = GMCHookState.from_config(GMCConfig(method=method, compressor="topk"))
        with pytest.raises(TypeError, match="use method='ef' to keep Adam/AdamW"):
            state.attach(model, torch.optim.AdamW(model.parameters()))
    state = GMCHookState.from_config(GMCConfig())
    with pytest.raises(ValueError, match="nesterov=False.*method='ef'"):
        state.attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))


def test_ef_refuses_options_that_belong_to_the_optimizer() -> None:
    with pytest.raises(ValueError, match="leaves momentum to the optimizer"):
        GMCStrategy(method="ef", momentum=0.9)
    with pytest.raises(ValueError, match="no detach"):
        GMCStrategy(method="ef", detach=0.5)
    with pytest.raises(ValueError, match="leaves momentum and weight decay to the optimizer"):
        Simulator({"w": (4,)}, K, method="ef", weight_decay=0.01)
    with pytest.raises(ValueError, match="leaves momentum"):
        Simulator({"w": (4,)}, K, method="ef", momentum=0.9)
    # methods that take over keep the simulator's defaults (beta = 0.9)
    assert Simulator({"w": (4,)}, K, method="gmc").momentum == pytest.approx(0.9)


def test_ef21_leaves_the_optimizer_alone_too() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    state = GMCHookState.from_config(GMCConfig(method="ef21", compressor="topk", density=0.5))
    state.attach(model, optimizer)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    saved = state.state_dict()
    assert set(saved["local"]) == {"estimate"} and set(saved["shared"]) == {"aggregate"}


def test_ef_is_a_registered_strategy_with_topk_by_default() -> None:
    trainer = L.Trainer(strategy="ef", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, GMCStrategy)
    method = trainer.strategy.gmc_method
    assert isinstance(method, ErrorFeedback) and not method.takes_over_optimizer
    assert method.compressor.name == "topk"
    assert method.evaluation_point == "params"
    assert math.isclose(GMCStrategy(method="ef", density=0.02).gmc_method.compressor.density, 0.02)  # type: ignore[attr-defined]


def test_fabric_with_adamw_clips_and_steps_on_the_compressed_gradient() -> None:
    from helpers import loss_fn, make_model

    from lightning_gmc import GMCFabricStrategy

    strategy = GMCFabricStrategy(method="ef", compressor="topk", density=0.5)
    fabric = L.Fabric(strategy=strategy, accelerator="cpu", devices=1)
    fabric.launch()
    model, reference = make_model("small"), make_model("small")
    x, y = torch.randn(8, 24, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 6
    loss_fn(reference, x, y).backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    fabric.backward(loss_fn(model, x, y))
    # one rank: the gradient the optimizer sees is C(e + g) with e = 0, top-k per parameter
    compress = TopK(0.5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        expected = compress(q.grad.reshape(-1), 0, [(0, q.numel())]).view_as(q)
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7)
    fabric.clip_gradients(model, optimizer, max_norm=1.0)  # acts on the averaged gradient, as under DDP
    optimizer.step()
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert set(optimizer.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
