"""fp16 overflow on 2 gloo ranks: every rank refuses the step alike and goes on from the state before
it, or, uncaught, every process ends with the error (exit status 1, never an abort).

References: the same training without the refused steps, from the same start (bitwise equal), and
the processes' exit status. Two runs of ``fp16_overflow_script.py`` per launch mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, _free_port

SCRIPT = Path(__file__).resolve().parent / "fp16_overflow_script.py"


def _launch(mode: str, out_dir: Path, timeout: float = 240.0) -> list[subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), mode, str(out_dir)],
            env={**env, "RANK": str(rank), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    done = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} hung") from None
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def test_every_rank_refuses_the_step_and_goes_on_from_the_state_before_it(tmp_path: Path) -> None:
    procs = _launch("catch", tmp_path)
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank}:\n{proc.stderr[-4000:]}"
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
