"""Plant known bugs one at a time in a scratch copy of the repository and show which tests fail.

    python tools/planted_bugs.py [--only NAME ...] [--keep]

Each bug below is a small source edit (an exact string replaced once) that an earlier version of the
test suite let through. For every bug the script copies the tracked files of the working tree into a
scratch directory, applies the edit, runs the tests named for it there (the multi-process tests set
PYTHONPATH to that copy, so the ranks import the bugged package too), and prints a Markdown table:
the bug, the tests, and whether they failed ("killed") as they must. Exit status 1 when a bug survives
or an edit no longer applies (the code moved: update the edit). Not part of CI (about 10 minutes on
2 cores); docs/testing.md records its last output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_bug import PlantedBug  # noqa: E402
from planted_bugs_edges import EDGE_BUGS  # noqa: E402
from planted_bugs_planner import PLANNER_BUGS  # noqa: E402

BUGS: tuple[PlantedBug, ...] = (
    PlantedBug(
        "padded_allgather",
        "the all-gather payload padded by 4 %",
        "lightning_gmc/transport/exchange/routes.py",
        "        nbytes = plan.payload_nbytes\n",
        "        nbytes = plan.payload_nbytes + max(1, plan.payload_nbytes // 25)\n",
        (
            "tests/distributed/test_strategy_distributed.py::test_two_ranks_equal_the_simulator[gmc-topk]",
            "tests/distributed/test_claims_distributed.py::test_quantizer_on_two_ranks_equals_the_hand_written_quantized_step",
        ),
    ),
    PlantedBug(
        "reset_keeps_residual_drops_momentum",
        "on a world-size change, the old residual kept and the momentum dropped",
        "lightning_gmc/hook/codec.py",
        '    if load_local:\n        worker.load_state_dict(state["local"])\n'
        '    else:\n        method.reset_local(worker)'
        '  # zero, except what an invariant ties to the shared buffers\n',
        '    worker.load_state_dict(state["local"])\n'
        '    if not load_local:\n        worker.reset("shared")\n',
        (
            "tests/hook/test_claims_hook.py::test_reset_residuals_zeroes_them_and_keeps_the_momentum",
            "tests/distributed/test_strategy_distributed.py::test_world_size_change_errors_or_resets_residuals",
        ),
    ),
    PlantedBug(
        "hook_forgets_previous_lr",
        'the hook forgets the previous learning rate (`momentum_lr_convention="cur"`)',
        "lightning_gmc/hook/binding.py",
        "prev = prev_lrs if prev_lrs is not None else lrs",
        "prev = lrs",
        (
            "tests/hook/test_claims_hook.py::test_hook_equals_the_hand_written_gmc_step",
            "tests/distributed/test_claims_distributed.py::"
            "test_resume_with_the_cur_convention_is_bitwise_and_equals_the_hand_written_step",
        ),
    ),
    PlantedBug(
        "lr_history_not_saved",
        "the saved LR history dropped from the checkpoint",
        "lightning_gmc/hook/codec.py",
        '"last_lrs": clock.last_lrs,',
        '"last_lrs": None,',
        (
            "tests/hook/test_claims_hook.py::test_resume_through_the_hook_is_bitwise_equal",
            "tests/distributed/test_claims_distributed.py::"
            "test_resume_with_the_cur_convention_is_bitwise_and_equals_the_hand_written_step",
        ),
    ),
    PlantedBug(
        "detach_zero_ignored",
        "`detach=0` ignored in GMC+ (taken as 0.5)",
        "lightning_gmc/methods/gmc.py",
        "self.detach = float(detach)",
        "self.detach = float(detach) or 0.5",
        (
            "tests/methods/test_gmc_math.py::test_gmc_plus_with_detach_zero_is_the_hand_written_gmc_step",
            "tests/hook/test_claims_hook.py::test_gmc_plus_equals_the_hand_written_step_and_detach_zero_is_gmc",
        ),
    ),
    PlantedBug(
        "skip_wipes_state",
        "a rank that skips a non-finite bucket also wipes its residual and momentum",
        "lightning_gmc/hook/ddp_hook.py",
        "            grad.zero_()\n",
        "            grad.zero_()\n            state.worker.reset()  # type: ignore[union-attr]\n",
        (
            "tests/hook/test_claims_hook.py::test_nonfinite_bucket_contributes_zero_and_keeps_the_state",
            "tests/distributed/test_strategy_distributed.py::test_nonfinite_gradient_is_skipped_without_poisoning_state",
        ),
    ),
    PlantedBug(
        "gmc_momentum_dropped",
        "GMC's momentum term dropped",
        "lightning_gmc/methods/gmc.py",
        "return hyper.momentum * scale",
        "return 0.0",
        (
            "tests/distributed/test_strategy_distributed.py::test_two_ranks_equal_the_simulator",
            "tests/distributed/test_claims_distributed.py::"
            "test_resume_with_the_cur_convention_is_bitwise_and_equals_the_hand_written_step",
        ),
    ),
    PlantedBug(
        "ef21_absorbs_with_the_wrong_sign",
        "EF21 adds a 16-bit sum's remainder to its estimate instead of taking it back",
        "lightning_gmc/methods/ef21.py",
        'undelivered.add_to(step.buffer("estimate"), sign=-1.0)',
        'undelivered.add_to(step.buffer("estimate"), sign=1.0)',
        ("tests/methods/test_wire_rounding_invariants.py::test_ef21_aggregate_stays_the_mean_of_the_estimates",),
    ),
    PlantedBug(
        "owner_ignores_the_parameter_index",
        "the owner of a 16-bit sum's element depends on its position only, not on its parameter",
        "lightning_gmc/transport/exchange/ordered.py",
        "torch.arange(count, dtype=torch.int64).add_(segment.param_index).remainder_(world_size)",
        "torch.arange(count, dtype=torch.int64).remainder_(world_size)",
        ("tests/transport/test_rank_ordered_sum.py",),
    ),
    PlantedBug(
        "remainder_with_the_wrong_sign",
        "the remainder of a rounded 16-bit sum taken as round(S) - S",
        "lightning_gmc/transport/exchange/ordered.py",
        "torch.sub(total, near, out=",
        "torch.sub(near, total, out=",
        ("tests/methods/test_wire_rounding_invariants.py",),
    ),
    PlantedBug(
        "refusal_keeps_the_refused_counters",
        "a refused fp16 step's traffic stays in the counters",
        "lightning_gmc/hook/refusal.py",
        "            self.stats.restore(self._counters)\n",
        "            pass\n",
        ("tests/hook/test_fp16_refusal.py",),
    ),
    PlantedBug(
        "snapshot_keeps_only_the_first_buffer",
        "a refused step restores the residual but not the momentum",
        "lightning_gmc/methods/state.py",
        "        for name, buffer in bucket.buffers.items():\n"
        '            bucket.workspace(f"snapshot_{name}")',
        "        for name, buffer in list(bucket.buffers.items())[:1]:\n"
        '            bucket.workspace(f"snapshot_{name}")',
        ("tests/hook/test_fp16_refusal.py",),
    ),
    PlantedBug(
        "complete_decodes_before_absorbing",
        "a 16-bit sum's remainder reaches the method after decode (CSER's model misses it)",
        "lightning_gmc/methods/base.py",
        "        for slot, message in enumerate(messages):\n"
        "            if message.undelivered is not None:\n"
        "                self.absorb_undelivered(step, slot, message.undelivered)\n"
        "        self.decode(step, means)\n",
        "        self.decode(step, means)\n"
        "        for slot, message in enumerate(messages):\n"
        "            if message.undelivered is not None:\n"
        "                self.absorb_undelivered(step, slot, message.undelivered)\n",
        ("tests/methods/test_wire_rounding_invariants.py::test_cser_average_model_follows_the_mean_update",),
    ),
    PlantedBug(
        "deterministic_mode_ignored",
        "dense fp32 sums stay on the ring under deterministic algorithms",
        "lightning_gmc/transport/exchange/core.py",
        'return "rank" if torch.are_deterministic_algorithms_enabled() else None',
        "return None",
        ("tests/transport/test_rank_ordered_sum.py",),
    ),
) + EDGE_BUGS + PLANNER_BUGS


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line and (ROOT / line).is_file()]


def _scratch_copy(into: Path) -> None:
    for rel in _tracked_files():
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def _plant(copy: Path, bug: PlantedBug) -> None:
    path = copy / bug.path
    text = path.read_text()
    count = text.count(bug.old)
    if count != 1:
        raise SystemExit(f"{bug.name}: the edit matches {count} times in {bug.path}; update it to the code")
    path.write_text(text.replace(bug.old, bug.new))


def _run_test(copy: Path, test: str) -> tuple[bool, str]:
    """Run one test in the bugged copy: (failed, the first assertion line of the failure)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 1):  # 2-5: collection error, unknown test id, nothing ran
        raise SystemExit(f"{test} could not run (pytest exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    errors = [ln.strip() for ln in proc.stdout.splitlines() if ln.startswith("E ")]
    return proc.returncode == 1, (errors[0][1:].strip() if errors else "")[:90]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of the bugs to plant (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    args = parser.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    survived = 0
    rows = ["| planted bug | test | result | first failure line |", "|---|---|---|---|"]
    for bug in bugs:
        scratch = Path(tempfile.mkdtemp(prefix=f"planted-{bug.name}-"))
        try:
            _scratch_copy(scratch)
            _plant(scratch, bug)
            for test in bug.tests:
                failed, why = _run_test(scratch, test)
                survived += not failed
                verdict = "killed" if failed else "**survived**"
                reason = why.replace("|", "\\|")
                rows.append(
                    f"| {bug.what} | `{test}` | {verdict} | `{reason}` |"
                    if reason
                    else f"| {bug.what} | `{test}` | {verdict} | |"
                )
                print(f"{bug.name}: {test}: {verdict} ({why})", file=sys.stderr, flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(rows))
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
