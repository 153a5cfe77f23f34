"""Summation order with 3 gloo ranks: bitwise resume, independence of DDP's bucket layout, and the
run equal to the simulator, where the library promises them (docs/algorithms.md 3.10 and 3.12).

One launch of ``sum_order_script.py`` on 3 ranks trains every case three times from the same start:
small buckets, one bucket, and small buckets interrupted half-way and resumed in a new DDP model
(whose first step runs in DDP's initial bucket order). Promised bitwise:

* a sparse shared support's fp32 values (``rbgs``, ``topk_shared``), summed in rank order by default;
* dense fp32 vectors (``compressor="none"``, the dense fallback) under
  ``torch.use_deterministic_algorithms(True)`` (what ``Trainer(deterministic=True)`` sets);
* 16-bit values (``wire_dtype="bf16"``), always: added in fp32 in rank order, rounded once by each
  element's owner (which is fixed per parameter element, not per bucket).

Without deterministic mode a dense fp32 vector is one ring all-reduce, whose order depends on the bucket
layout: the two layouts differ (what the docs say, and proof that this test can tell).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sum_order_script as script
import torch
from launch import TESTS, launch_ranks
from torch import nn

from lightning_gmc import Simulator

SCRIPT = TESTS / "sum_order_script.py"
WORLD = 3


def _launch(out_dir: Path, timeout: float = 300.0) -> list[dict[str, Any]]:
    launch_ranks([SCRIPT, out_dir], WORLD, timeout=timeout)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _launch(tmp_path_factory.mktemp("sum_order"))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


PROMISED = ["rbgs_fp32", "topk_shared_fp32", "none_fp32_deterministic", "ef21_rbgs_bf16"]


@pytest.mark.parametrize("case", PROMISED)
def test_bucket_layout_and_resume_do_not_change_a_bit(results: list[dict[str, Any]], case: str) -> None:
    for rank, result in enumerate(results):
        runs = result[case]
        assert runs["buckets"] >= 2, "the small-bucket run must really have several buckets"
        for other in ("one_bucket", "resumed"):
            assert _equal(runs["small_buckets"]["model"], runs[other]["model"]), (rank, other, "parameters")
            assert _equal(runs["small_buckets"]["gmc"]["local"], runs[other]["gmc"]["local"]), (rank, other)
            assert _equal(runs["small_buckets"]["gmc"]["shared"], runs[other]["gmc"]["shared"]), (rank, other)


def test_without_deterministic_mode_a_dense_fp32_ring_follows_the_bucket_layout(
    results: list[dict[str, Any]],
) -> None:
    runs = results[0]["none_fp32_ring"]
    assert not _equal(runs["small_buckets"]["model"], runs["one_bucket"]["model"])


def _replay(case: str) -> tuple[dict[str, torch.Tensor], Simulator]:
    """The case's run in the simulator (K = 3), step by step from the same start and batches."""
    torch.set_num_threads(1)  # the ranks' matmul rounding
    method, options, _ = script.CASES[case]
    model = script.make_model()
    sim = Simulator(
        dict(model.named_parameters()),
        WORLD,
        method=method,
        momentum=0.9 if method == "gmc" else None,
        **options,
    )
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(script.STEPS):
        grads = []
        for rank in range(WORLD):
            model.zero_grad()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(w[name])
            x, y = script.batch(rank, step)
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        direction = sim.step(grads, [w] * WORLD, script.LR)[0]
        w = {name: w[name].add(direction[name], alpha=-script.LR) for name in w}  # as SGD adds it
    return w, sim


@pytest.mark.parametrize("case", PROMISED)
def test_three_ranks_equal_the_simulator_bit_for_bit(results: list[dict[str, Any]], case: str) -> None:
    params, sim = _replay(case)
    for rank, result in enumerate(results):
        run = result[case]["small_buckets"]
        assert _equal(
            {k: v for k, v in run["model"].items()}, {k.replace("", ""): v for k, v in params.items()}
        )
        own = sim.workers[rank].state_dict("local")
        assert _equal(run["gmc"]["local"], own), rank


def test_ef21_with_bf16_keeps_the_aggregate_the_mean_of_the_estimates(results: list[dict[str, Any]]) -> None:
    states = [result["ef21_rbgs_bf16"]["small_buckets"]["gmc"] for result in results]
    for name, h in states[0]["shared"]["aggregate"].items():
        mean = sum(state["local"]["estimate"][name].double() for state in states) / WORLD
        assert float((h.double() - mean).norm()) <= 1e-6 * float(h.double().norm()), name
