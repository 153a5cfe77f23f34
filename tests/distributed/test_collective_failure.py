"""A failed collective stops every surviving rank with an error naming it; nothing stale is applied.

Two plain-DDP processes (gloo) run ``gmc_hook``; rank 1 disappears at step 3. Rank 0 must fail in
that step's backward, with the collective, the bucket and the step in its error, and must not
finish the step (a plain DDP run fails the same way, with "Connection closed by peer").
"""

from __future__ import annotations

import pytest
from launch import TESTS, Finished, launch_ranks

SCRIPT = TESTS / "dead_peer_script.py"
STEPS = 8


def _run_pair(compressor: str, mode: str) -> list[Finished]:
    # A rank still running after 90 s hung after its peer died: the launch fails and names it.
    return launch_ranks([SCRIPT, compressor, mode, STEPS], world_size=2, timeout=90, check=False)


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


def test_nothing_of_a_half_summed_step_reaches_a_checkpoint() -> None:
    # compressor "none": GMC stages u_k in its momentum buffer and the all-reduce sums in place, so a
    # failed all-reduce leaves the momentum half-summed; the state then refuses to be saved (a Lightning
    # checkpoint, OnExceptionCheckpoint's included, goes through state_dict() on every rank), and a
    # resume can only start from a checkpoint written before the failure.
    survivor, _ = _run_pair("none", "exit_save")
    assert "rank 0 step 3 failed" in survivor.stdout, survivor.stdout + survivor.stderr[-3000:]
    assert "rank 0 momentum changed in the failed step: True" in survivor.stdout  # what would be saved
    assert "rank 0 refused to save: lightning_gmc: the GMC state cannot be saved" in survivor.stdout
    assert "Resume from the last checkpoint written before the failure" in survivor.stdout
    assert "saved the GMC state" not in survivor.stdout


def test_a_nonfinite_raise_on_one_rank_stops_the_other() -> None:
    survivor, raising = _run_pair("topk", "nan")
    assert raising.returncode != 0 and "FloatingPointError" in raising.stderr
    assert survivor.returncode != 0, f"rank 0 trained on alone:\n{survivor.stdout}"
    assert "finished step 3" not in survivor.stdout and "done" not in survivor.stdout
    assert "the all_gather of message 0 of bucket 0" in survivor.stderr, survivor.stderr[-3000:]
    assert "at step 3 on rank 0" in survivor.stderr
