"""The planted bugs of the planner's fixed costs, ``density="auto"``'s trials, the dense route's zero
residual and the metrics' cadence: planted by ``tools/planted_bugs.py`` (``--only NAME``) with the
tests that kill them (docs/testing.md, "Planted bugs": the planner's fixed costs, ...)."""

from __future__ import annotations

from planted_bug import PlantedBug

_AUTO = "lightning_gmc/hook/auto_density.py"
_AUTO_TESTS = ("tests/hook/test_auto_density.py",)

PLANNER_BUGS: tuple[PlantedBug, ...] = (
    PlantedBug(
        "zero_residual_version_ignored",
        "the dense route's residual counts as zero even after a write to it",
        "lightning_gmc/methods/state.py",
        "        return entry is not None and entry[0] is buffer and buffer._version == entry[1]",
        "        return entry is not None and entry[0] is buffer",
        ("tests/methods/test_dense_route_zero_residual.py",),
    ),
    PlantedBug(
        "zero_residual_coefficient_dropped",
        "the shortcut stages g + m instead of g + beta m",
        "lightning_gmc/methods/base.py",
        "    torch.add(first, last, alpha=c_last, out=x)",
        "    torch.add(first, last, out=x)",
        ("tests/methods/test_dense_route_zero_residual.py",),
    ),
    PlantedBug(
        "bucket_cost_not_counted",
        "the pipeline leaves out the fixed cost of each bucket",
        "lightning_gmc/plan/profile.py",
        "    return ns * 1e-9 + traffic.buckets * fixed",
        "    return ns * 1e-9",
        ("tests/plan/test_plan_cost.py",),
    ),
    PlantedBug(
        "trial_not_confirmed",
        "a switch to an unmeasured setting waits a whole interval",
        _AUTO,
        "        if trial:\n",
        "        if False:\n",
        _AUTO_TESTS,
    ),
    PlantedBug(
        "measured_step_not_used",
        "a setting measured in this round counts with its prediction",
        _AUTO,
        "            step_s = self.measured_steps.get(density, compute + extra[density][0])",
        "            step_s = compute + extra[density][0]",
        _AUTO_TESTS,
    ),
    PlantedBug(
        "trial_kept_by_hysteresis",
        "a trial measured up to 10 % slower stays by hysteresis",
        _AUTO,
        '        chosen_before = bool(self.history) and not self.history[-1].get("trial")',
        "        chosen_before = bool(self.history)",
        _AUTO_TESTS,
    ),
    PlantedBug(
        "close_call_never_tried",
        "a candidate predicted within explore of the kept setting is never tried",
        "lightning_gmc/plan/decide.py",
        "    if margin <= 0 or chosen.density not in measured:",
        "    if True:",
        ("tests/hook/test_auto_density.py", "tests/plan/test_plan_cost.py"),
    ),
    PlantedBug(
        "measured_steps_not_saved",
        "a checkpoint forgets the steps measured in the round",
        _AUTO,
        '            "measured_steps": [[density, step_s]',
        '            "measured_stepz": [[density, step_s]',
        _AUTO_TESTS,
    ),
    PlantedBug(
        "metrics_every_step",
        "the strategy hands every step's metrics to Lightning",
        "lightning_gmc/strategy.py",
        "    return step == 0 or last or _is_logging_step(trainer)",
        "    return True",
        ("tests/strategy/test_metrics_cadence.py",),
    ),
    PlantedBug(
        "metrics_last_step_missed",
        "the last step of a fit does not hand its metrics over",
        "lightning_gmc/strategy.py",
        "    return step == 0 or last or _is_logging_step(trainer)",
        "    return step == 0 or _is_logging_step(trainer)",
        ("tests/strategy/test_metrics_cadence.py",),
    ),
    PlantedBug(
        "fabric_residual_norm_stale",
        "Fabric's gmc_metrics() leaves out the residual norm",
        "lightning_gmc/fabric.py",
        "        taken = {**self.last_metrics, **self.gmc_state.device_metrics()}",
        "        taken = dict(self.last_metrics)",
        ("tests/strategy/test_metrics_cadence.py",),
    ),
)
