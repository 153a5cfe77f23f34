"""The non-IID study script runs end to end, its seed moves everything random, and the simulator's
evaluation model is the documented one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from launch import REPO, run_script

from lightning_gmc import Simulator


def test_study_quick_mode_writes_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "study"
    argv = [REPO / "examples" / "noniid_study.py", "--quick", "--workers", "4", "--out", out]
    run_script(argv, cwd=REPO, timeout=300)  # the simulator's workers: one process
    table = (out / "results.md").read_text()
    for label in ("DMSGD (dense)", "GMC", "CSER", "GMC+ agg. momentum (RBGS, lambda=0.5)"):
        assert f"| {label} |" in table
    assert "Command: `python examples/noniid_study.py --quick" in table
    assert (out / "curves_topk.png").stat().st_size > 0
    assert (out / "curves_rbgs.png").stat().st_size > 0
    assert "| EF + AdamW (top-k) |" in table and (out / "curves_adamw.png").stat().st_size > 0


def _dense_run(seed: int) -> dict[str, Any]:
    from examples.noniid_study import DENSE, SeedPlan, run_one, suite_arms

    args = argparse.Namespace(
        workers=4, alpha=0.1, epochs=1, density=0.01, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=16
    )
    plan = SeedPlan(seed)
    shards, test = plan.shards(args.workers, args.alpha)
    return run_one(suite_arms("topk", args.density)[DENSE], plan, args, shards, test)


def test_the_seed_moves_split_init_and_batch_order_of_the_dense_baseline() -> None:
    from examples.noniid_study import SeedPlan

    torch.set_num_threads(1)
    one, two = SeedPlan(0), SeedPlan(1)
    assert not torch.equal(one.init_params()["conv1.weight"], two.init_params()["conv1.weight"])
    torch.testing.assert_close(one.init_params(), SeedPlan(0).init_params())  # and only the seed
    shards_one, test_one = one.shards(4, 0.1)
    shards_two, test_two = two.shards(4, 0.1)
    counts = [[torch.bincount(y, minlength=10).tolist() for _, y in s] for s in (shards_one, shards_two)]
    assert counts[0] != counts[1]  # another Dirichlet partition
    assert torch.equal(test_one[1], test_two[1])  # the test digits stay fixed
    assert not torch.equal(one.batch_order(0, 0, 100), two.batch_order(0, 0, 100))
    assert not torch.equal(one.batch_order(0, 0, 100), one.batch_order(1, 0, 100))  # reshuffled per epoch
    # The dense arm (no compressor randomness) differs between seeds and repeats for one seed.
    first, again, other = _dense_run(0), _dense_run(0), _dense_run(1)
    assert first["test_loss"] == again["test_loss"]
    assert first["test_loss"] != other["test_loss"]


def test_evaluation_params_follow_each_method() -> None:
    shapes = {"w": torch.zeros(6)}
    workers = [{"w": torch.arange(6.0) + k} for k in range(3)]
    gmc = Simulator(shapes, 3, method="gmc", compressor="topk", density=0.5)
    assert torch.equal(gmc.evaluation_params(workers, 0.1)["w"], workers[0]["w"])
    cser = Simulator(shapes, 3, method="cser", compressor="topk", density=0.5)
    torch.testing.assert_close(cser.evaluation_params(workers, 0.1)["w"], torch.arange(6.0) + 1)
    # DEF-A evaluates x_t - (1/K) sum_k e_k (docs/algorithms.md 2.6), residuals in parameter units
    def_a = Simulator(shapes, 3, method="def_a", compressor="topk", density=0.5)
    for k, worker in enumerate(def_a.workers):
        worker.tensors["residual"][0].fill_(float(k + 1))
    torch.testing.assert_close(def_a.evaluation_params(workers, 0.1)["w"], workers[0]["w"] - 2.0)


def test_the_optimizer_path_reproduces_the_method_path() -> None:
    # ef with the identity compressor and torch's SGD(momentum, weight_decay) applied by the caller is
    # dense momentum SGD, which the DMSGD arm runs inside the method: the two arms must agree.
    from examples.noniid_study import DENSE, SeedPlan, run_one, run_one_with_optimizer, suite_arms

    torch.set_num_threads(1)
    args = argparse.Namespace(
        workers=4, alpha=0.1, epochs=1, density=0.01, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=16
    )
    plan = SeedPlan(0)
    shards, test = plan.shards(args.workers, args.alpha)
    dense = run_one(suite_arms("adamw", args.density)[DENSE], plan, args, shards, test)
    spec = {"method": "ef", "compressor": "none", "optimizer": "sgd"}
    through_torch = run_one_with_optimizer(spec, plan, args, shards, test)
    assert abs(dense["test_loss"][0] - through_torch["test_loss"][0]) < 1e-4
    assert dense["curve"] == through_torch["curve"]
