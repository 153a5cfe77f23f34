"""fp16 overflow on 2 gloo ranks: every rank refuses the step alike and goes on from the state before
it, or, uncaught, every process ends with the error (exit status 1, never an abort).

References: the same training without the refused steps, from the same start (bitwise equal), and
the processes' exit status. Two runs of ``fp16_overflow_script.py`` per launch mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from launch import TESTS, Finished, launch_ranks

SCRIPT = TESTS / "fp16_overflow_script.py"


def _launch(mode: str, out_dir: Path) -> list[Finished]:
    """Two ranks of the script in ``mode``. The uncaught modes end with status 1 by design, so only
    "catch" fails the launch on an exit status; a hung rank fails it in every mode."""
    return launch_ranks([SCRIPT, mode, out_dir], world_size=2, timeout=240, check=mode == "catch")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def test_every_rank_refuses_the_step_and_goes_on_from_the_state_before_it(tmp_path: Path) -> None:
    _launch("catch", tmp_path)  # every rank exits with status 0, or the launch fails naming it
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        refused, reference = result["refused"], result["reference"]
        # one rank overflowing (step 2) and both (step 4): refused on every rank alike
        assert [e.split(":")[0] for e in refused["errors"]] == ["step 2", "step 4"], refused["errors"]
        assert all("WireOverflow" in e and "the step was refused" in e for e in refused["errors"])
        assert refused["step"] == reference["step"] == 4
        for part in ("params", "optimizer", "gmc"):
            assert _equal(refused[part], reference[part]), (rank, part)


@pytest.mark.parametrize("mode", ["uncaught-one", "uncaught-all"])
def test_an_uncaught_overflow_ends_every_rank_with_the_error_not_an_abort(tmp_path: Path, mode: str) -> None:
    procs = _launch(mode, tmp_path)
    for rank, proc in enumerate(procs):
        assert proc.returncode == 1, f"rank {rank} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        assert "overflowed fp16" in proc.stderr and "finished step 2" not in proc.stdout
        assert "finished step 1" in proc.stdout and "terminate called" not in proc.stderr
