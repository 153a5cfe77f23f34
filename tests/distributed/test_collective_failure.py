"""A failed collective stops every surviving rank with an error naming it; nothing stale is applied.

Two plain-DDP processes (gloo) run ``gmc_hook``; rank 1 disappears at step 3. Rank 0 must fail in
that step's backward, with the collective, the bucket and the step in its error, and must not
finish the step (a plain DDP run fails the same way, with "Connection closed by peer").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, _free_port

SCRIPT = Path(__file__).resolve().parents[1] / "dead_peer_script.py"
STEPS = 8


def _run_pair(compressor: str, mode: str) -> list[subprocess.CompletedProcess[str]]:
    base = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    base.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), compressor, mode, str(STEPS)],
            env={**base, "RANK": str(rank), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} hung after its peer died") from None
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.parametrize(
    ("compressor", "collective"),
    [("topk", "all_gather"), ("rbgs", "all_reduce")],
    ids=["allgather-route", "allreduce-route"],
)
def test_a_dead_peer_stops_the_surviving_rank(compressor: str, collective: str) -> None:
    survivor, dead = _run_pair(compressor, "exit")
    assert "finished step 2" in dead.stdout and "finished step 3" not in dead.stdout
    assert survivor.returncode != 0, f"rank 0 trained on alone:\n{survivor.stdout}"
    assert "finished step 2" in survivor.stdout
    assert "finished step 3" not in survivor.stdout and "done" not in survivor.stdout
    assert f"the {collective} of message 0 of bucket 0" in survivor.stderr, survivor.stderr[-3000:]
    assert "at step 3 on rank 0" in survivor.stderr
    assert "no update was applied" in survivor.stderr


def test_a_nonfinite_raise_on_one_rank_stops_the_other() -> None:
    survivor, raising = _run_pair("topk", "nan")
    assert raising.returncode != 0 and "FloatingPointError" in raising.stderr
    assert survivor.returncode != 0, f"rank 0 trained on alone:\n{survivor.stdout}"
    assert "finished step 3" not in survivor.stdout and "done" not in survivor.stdout
    assert "the all_gather of message 0 of bucket 0" in survivor.stderr, survivor.stderr[-3000:]
    assert "at step 3 on rank 0" in survivor.stderr
