"""The benchmarks' timing harness (benchmarks/harness.py): what it calls, in which order, what it records,
and the load-independent pass count. No timing is asserted: timings belong to the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from harness import Arm, interleaved, large_ops, medians  # noqa: E402


def test_rounds_interleave_the_arms_and_drop_the_warmup() -> None:
    calls: list[str] = []

    def arm(name: str) -> Arm:
        return Arm(
            name,
            run=lambda: calls.append(f"run {name}"),
            setup=lambda: calls.append(f"setup {name}"),
            after=lambda measured: calls.append(f"after {name} {measured}"),
        )

    samples = interleaved(
        [arm("a"), arm("b")],
        rounds=2,
        warmup=1,
        before_round=lambda r: calls.append(f"round {r}"),
        combine=lambda seconds: -1.0,
    )
    one_round = ["setup a", "run a", "after a {m}", "setup b", "run b", "after b {m}"]
    expected = [f"round {r}" for r in range(3)]
    assert calls == [
        line.format(m=r > 0) for r, head in enumerate(expected) for line in [head, *one_round]
    ]
    assert samples == {"a": [-1.0, -1.0], "b": [-1.0, -1.0]}  # combined, warm-up round left out
    assert medians({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}


def test_arm_names_must_be_unique_and_cpu_time_is_for_the_cpu() -> None:
    with pytest.raises(ValueError, match="unique"):
        interleaved([Arm("a", lambda: None), Arm("a", lambda: None)], rounds=1)
    with pytest.raises(ValueError, match="cpu_time"):
        interleaved([Arm("a", lambda: None)], rounds=1, device="cuda", cpu_time=True)


def test_large_ops_counts_passes_over_big_tensors_only() -> None:
    a, b, c = torch.randn(4096), torch.randn(4096), torch.empty(4096)
    small = torch.randn(8)

    def step() -> None:
        a.add_(b)  # one pass
        a[:100].mul_(2.0)  # a slice of a is a view (no pass), the mul_ on 100 elements is small
        torch.add(a, b, alpha=0.5, out=c)  # one pass
        c.zero_()  # one pass, counted once (as fill_ where zero_ runs it)
        small.mul_(3.0)  # small

    *adds, zero = large_ops(step, 2048)
    assert adds == ["aten::add_", "aten::add"] and zero in ("aten::zero_", "aten::fill_")
