"""``density="auto"``: time the run, predict every candidate's step, switch densities between steps.

:class:`AutoDensityController` belongs to a :class:`~lightning_gmc.hook.GMCHookState` (so plain DDP,
Fabric and the Trainer get it alike) and runs from a post-hook of the optimizer's ``step``, i.e.
between two steps, on every rank at the same step of the shared step clock. At each decision step
(``warmup_steps``, then every ``interval`` steps):

1. every rank takes the median of its step intervals since the last decision (the first two after a
   start or a switch are not timed: they allocate plans and workspaces), times a 4-byte all-reduce
   (the latency) and an all-reduce of known size on the method's process group (growing eightfold
   from 256 KiB until it takes 20 latencies and 5 ms, or reaches 64 MiB), and the maxima over ranks
   are all-reduced, so every rank holds the same measurements;
2. rank 0 of the group predicts each candidate's step with the cost model (:mod:`lightning_gmc.plan`):
   the compute time is the measured step minus the current setting's predicted pipeline and
   communication, each candidate's step that compute plus its own; it picks one with
   :func:`~lightning_gmc.plan.choose_density` and broadcasts the decision;
3. every rank replaces the method's compressor (a ``dataclasses.replace``d value with its own cached
   plan per bucket, or the identity for the dense route) before the next step.

**Predictions are confirmed by measurement.** A decision that switches to a setting not measured yet
is a trial: the next decision comes ``trial_steps`` later and uses the measured step of every
setting run since the round began (the interval's first decision) instead of its prediction, so a
setting the cost model thought faster but is not is left again after one trial. A decision that
would keep a measured setting tries a candidate predicted within ``explore`` of it first (a close
call is settled by measurement, not by the model's error). When a decision keeps a measured setting
and nothing is close, the round ends: the next one is ``interval`` steps later and starts afresh (the
link and the load may have changed).

What a change of density does to the method's state: nothing is reset. Residuals are in gradient
units (``docs/algorithms.md`` 2.2), so they keep their meaning under another density and are sent as
the new compressor selects them; with the dense route (``compressor="none"``) the whole residual is
sent with the next step's vector and stays zero afterwards, so GMC is then exactly DMSGD (DDP with SGD
momentum), the global momentum continuing unchanged. The decision, its history and the next decision
step are part of the GMC checkpoint state and restored bitwise.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_gmc.compressors import Compressor, Identity
from lightning_gmc.config import AutoDensity
from lightning_gmc.hook.binding import StepClock
from lightning_gmc.hook.checkpoint_schema import check_auto_state
from lightning_gmc.methods import Method, ParameterTable, WorkerState
from lightning_gmc.plan import (
    Arm,
    Cluster,
    DeviceProfile,
    Option,
    arm_traffic,
    choose_density,
    density_grid,
    load_profile,
    predict,
    worth_a_trial,
)
from lightning_gmc.transport import ring_allreduce_bytes

__all__ = ["AutoDensityController", "Measurement", "default_profile"]

log = logging.getLogger(__name__)

_STATE_FORMAT = 1
_PROBE_START, _PROBE_CAP = 1 << 18, 1 << 26
_SKIP_AFTER_SWITCH = 2


@dataclass(frozen=True)
class Measurement:
    """What the ranks measured at a decision step (maxima over ranks: identical on every rank)."""

    step_s: float
    latency_s: float
    link_bps: float


def default_profile(device: torch.device) -> DeviceProfile:
    """The shipped profile of ``device``: ``cpu``, or ``h200`` / ``h100`` by the CUDA device's name
    (other GPUs get ``h100``'s derived costs, with a warning)."""
    if device.type != "cuda":
        return load_profile("cpu")
    name = torch.cuda.get_device_name(device).upper()
    for key in ("H200", "H100"):
        if key in name:
            return load_profile(key.lower())
    log.warning("lightning_gmc: no device profile for %s; using h100's (calibrate: --calibrate)", name)
    return load_profile("h100")


def _log_decision(d: dict[str, Any], compute_s: float) -> None:
    chosen = "dense (compressor 'none')" if d["density"] is None else f"density {d['density']:g}"
    log.info(
        "lightning_gmc: density='auto' at step %d: %s (%s); link %.4g Mbit/s, latency %.3g ms, "
        "compute %.4g ms, predicted step %.4g ms",
        *(d["step"], chosen, d["reason"], d["link_bps"] / 1e6, d["latency_s"] * 1e3),
        *(compute_s * 1e3, d["predicted_step_s"] * 1e3),
    )


def _timed(call: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class AutoDensityController:
    """Chooses the density of ``density="auto"`` (module docstring).

    Args:
        options: the bounds and schedule.
    """

    def __init__(self, options: AutoDensity) -> None:
        self.options = options
        self.history: list[dict[str, Any]] = []
        self.next_decision = options.warmup_steps
        self.pinned: float | str | None = options.pin
        self.density: float | None = None  # None: the dense route
        #: measured step (seconds) of each setting run in this round of decisions (None: dense route)
        self.measured_steps: dict[float | None, float] = {}
        self.last: Measurement | None = None
        self.compute_s = 0.0
        #: what the decision step measures; tests replace it with fixed measurements
        self.measure: Callable[[], Measurement] = self._measure
        self._method: Method | None = None
        self._template: Compressor | None = None
        self._table = ParameterTable((), (), ())
        self._worker: WorkerState | None = None
        self._clock: StepClock | None = None
        self._group: dist.ProcessGroup | None = None
        self._device = torch.device("cpu")
        self._profile: DeviceProfile | None = None
        self._intervals: list[float] = []
        self._last_time: float | None = None
        self._last_step = -1
        self._skip = _SKIP_AFTER_SWITCH

    # ------------------------------------------------------------------------------------ wiring
    def attach(
        self,
        method: Method,
        clock: StepClock,
        worker: WorkerState,
        optimizer: torch.optim.Optimizer,
        process_group: dist.ProcessGroup | None,
    ) -> None:
        """Bind to the method (whose compressor it replaces) and time the optimizer's steps."""
        self._method, self._template, self._clock, self._worker = method, method.compressor, clock, worker
        self._table, self._group, self._device = worker.table, process_group, worker.device
        self.density = float(method.compressor.density)  # type: ignore[attr-defined]
        optimizer.register_step_post_hook(lambda *_: self.after_step())
        if self.pinned is not None:
            self._apply(None if self.pinned == "none" else float(self.pinned))

    @property
    def profile(self) -> DeviceProfile:
        if self._profile is None:
            name = self.options.profile
            self._profile = default_profile(self._device) if name is None else load_profile(name)
        return self._profile

    @property
    def world_size(self) -> int:
        distributed = dist.is_available() and dist.is_initialized()
        return dist.get_world_size(self._group) if distributed else 1

    # ----------------------------------------------------------------------------- the schedule
    def after_step(self) -> None:
        """Between two steps: time the step that ended; decide when the schedule says so."""
        assert self._clock is not None, "attach() runs before the first step"
        now, step = time.perf_counter(), self._clock.step
        if step == self._last_step:
            return  # an optimizer step without a gradient exchange (nothing was timed)
        if self._last_time is not None and step == self._last_step + 1:
            if self._skip > 0:
                self._skip -= 1
            else:
                self._intervals.append(now - self._last_time)
        self._last_time, self._last_step = now, step
        if step >= self.next_decision:
            self.decide()
            self._last_time = time.perf_counter()  # the probe is not part of the next step

    def pin(self, density: float | str | None) -> None:
        """Run ``density`` (or ``"none"``: the dense route) from the next step on, whatever the
        measurements say; None returns to automatic choice at the next decision. Call it on every rank
        between the same two steps (e.g. in a callback), as any setting of a distributed run."""
        if density is not None and density != "none":
            density = float(density)
            if not 0.0 < density <= 1.0:
                raise ValueError(f"pin a density in (0, 1] or 'none', got {density}")
        self.pinned = density
        if density is not None:
            self._apply(None if density == "none" else float(density))

    # ------------------------------------------------------------------------------ decisions
    def _probe(self, nbytes: int) -> float:
        buffer = torch.zeros(nbytes // 4, device=self._device)
        return min(_timed(lambda: dist.all_reduce(buffer, group=self._group), self._device) for _ in range(2))

    def _max_over_ranks(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._group)
        return [float(v) for v in tensor.tolist()]

    def _measure(self) -> Measurement:
        """Time the recent steps and the link (module docstring); identical on every rank."""
        step_s = statistics.median(self._intervals) if self._intervals else 0.0
        if self.world_size == 1:
            return Measurement(step_s, 0.0, float("inf"))
        small = torch.zeros(1, device=self._device)
        latency = statistics.median(
            _timed(lambda: dist.all_reduce(small, group=self._group), self._device) for _ in range(5)
        )
        size = _PROBE_START
        while True:
            probe_s, latency_s, step_s = self._max_over_ranks([self._probe(size), latency, step_s])
            if probe_s >= max(20 * latency_s, 5e-3) or size >= _PROBE_CAP:
                break
            size *= 8
        wire = ring_allreduce_bytes(size, self.world_size)
        return Measurement(step_s, latency_s, 8 * wire / max(probe_s - latency_s, 1e-9))

    def _arm(self, density: float | None) -> tuple[Arm, Compressor]:
        assert self._method is not None and self._template is not None
        detach = float(getattr(self._method, "detach", 0.0) or 0.0)
        if density is None:
            wire = getattr(self._template, "wire_dtype", "fp32")
            return Arm(self._method.name, "none", 1.0, detach, wire_dtype=wire), Identity(wire_dtype=wire)
        compressor = dataclasses.replace(self._template, density=density)  # type: ignore[type-var]
        return Arm(self._method.name, compressor.name, density, detach), compressor

    def options_for(self, measured: Measurement) -> tuple[list[Option], Option, float]:
        """Every candidate's predicted step for these measurements (the dense route and the densities
        within the bounds), and the compute time they imply: the measured step minus what the running
        setting's pipeline and communication are predicted to take. Returns the candidates, the running
        setting (which may lie outside the bounds when pinned) and the compute time."""
        assert self._worker is not None
        numels = self._table.numels
        buckets = [list(layout) for layout in self._worker.layouts] or [list(range(len(numels)))]
        workers = self.world_size
        cluster = Cluster(nodes=workers, inter_bps=measured.link_bps, inter_latency_s=0.0, efficiency=1.0)
        profile = dataclasses.replace(self.profile, collective_latency_s=measured.latency_s)
        candidates = [None, *density_grid(self.options.min_density, self.options.max_density)]
        extra: dict[float | None, tuple[float, float]] = {}
        for density in [*candidates, self.density]:
            arm, compressor = self._arm(density)
            traffic = arm_traffic(arm, numels, buckets, nodes=workers, compressor=compressor)
            p = predict(arm, numels, cluster, 0.0, profile, traffic=traffic)
            extra[density] = (p.step_s, p.comm_s)
        compute = max(measured.step_s - extra[self.density][0], 0.0)

        def option(density: float | None) -> Option:
            # a setting measured in this round counts with its measured step, not its prediction
            step_s = self.measured_steps.get(density, compute + extra[density][0])
            return Option(density, step_s, extra[density][1])

        return [option(d) for d in candidates], option(self.density), compute

    def decide(self) -> None:
        """Measure, choose on rank 0, broadcast, switch (a collective: every rank calls it)."""
        assert self._clock is not None
        step = self._clock.step
        measured = self.measure()
        if measured.step_s > 0:  # identical on every rank (the maxima over ranks)
            self.measured_steps[self.density] = measured.step_s
        decision: dict[str, Any] | None = None
        rank = dist.get_rank(self._group) if self.world_size > 1 else 0
        if rank == 0:
            options, running, compute = self.options_for(measured)
            chosen, reason = self._choose(options, running, compute)
            decision = {
                "step": step,
                "density": chosen.density,
                "compressor": "none" if chosen.density is None else self._arm(chosen.density)[1].name,
                "measured_step_s": measured.step_s,
                "latency_s": measured.latency_s,
                "link_bps": measured.link_bps,
                "compute_s": compute,
                "predicted_step_s": chosen.step_s,
                "reason": reason,
                "trial": chosen.density != self.density and chosen.density not in self.measured_steps,
            }
        if self.world_size > 1:
            box = [decision]
            source = dist.get_global_rank(self._group, 0) if self._group is not None else 0
            dist.broadcast_object_list(box, src=source, group=self._group, device=self._device)
            decision = box[0]
        assert decision is not None
        self.history.append(decision)
        self._intervals = []  # the next decision times the steps after this one
        self.last, self.compute_s = measured, float(decision["compute_s"])
        self._schedule(step, bool(decision["trial"]))
        if rank == 0:
            _log_decision(decision, self.compute_s)
        self._apply(decision["density"])

    def _choose(self, options: list[Option], running: Option, compute: float) -> tuple[Option, str]:
        """Rank 0's pick among ``options`` and why (:mod:`~lightning_gmc.plan.decide`)."""
        if self.pinned is not None:
            return running, "pinned"
        o = self.options
        # No hysteresis for a setting that was not chosen on its merits: the warm-up setting at the
        # first decision, or a trial (it stays only if its measured step wins).
        chosen_before = bool(self.history) and not self.history[-1].get("trial")
        current = running if running in options and chosen_before else None
        choice = choose_density(options, compute, o.comm_fraction, o.slack, o.hysteresis, current)
        if o.comm_fraction is None:
            trial = worth_a_trial(options, choice.option, self.measured_steps, o.explore)
            if trial is not None:
                return trial, f"trial: predicted within {o.explore:g} of the measured {choice.reason}"
        return choice.option, choice.reason

    def _schedule(self, step: int, trial: bool) -> None:
        """The next decision: after a trial's ``trial_steps``, or the next round's ``interval``."""
        if trial:
            self.next_decision = step + self.options.trial_steps
            return
        self.measured_steps = {}
        interval = self.options.interval
        self.next_decision = step + interval if interval else 2**62

    def _apply(self, density: float | None) -> None:
        """Run ``density`` (None: the dense route) from the next step on; nothing when it runs already."""
        assert self._method is not None
        compressor = self._arm(density)[1]
        if density == self.density and self._method.compressor == compressor:
            return
        self._method.compressor = compressor
        self.density = density
        self._intervals, self._skip = [], _SKIP_AFTER_SWITCH

    # ------------------------------------------------------------------------- state, metrics
    def state_dict(self) -> dict[str, Any]:
        """The decision, its history, the next decision step and the pin (plain Python values)."""
        return {
            "format": _STATE_FORMAT,
            "density": self.density,
            "pinned": self.pinned,
            "next_decision": self.next_decision,
            "history": [dict(entry) for entry in self.history],
            "measured_steps": [[density, step_s] for density, step_s in self.measured_steps.items()],
        }

    def check_state_dict(self, state: object, written_by: object = None) -> dict[str, Any]:
        """The saved state of :meth:`state_dict` after checking every field (restores nothing).

        Raises:
            ValueError: no state (the checkpoint was written with a fixed density), or a bad field.
        """
        return check_auto_state(state, _STATE_FORMAT, written_by)

    def compressor_for(self, density: float | None) -> Compressor:
        """The compressor this controller runs at ``density`` (None: the dense route)."""
        return self._arm(density)[1]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (after ``attach``): the method runs the saved density."""
        state = self.check_state_dict(state)
        self.pinned = state["pinned"]
        self.next_decision = int(state["next_decision"])
        self.history = [dict(entry) for entry in state["history"]]
        self.measured_steps = {density: float(step_s) for density, step_s in state.get("measured_steps", [])}
        self._apply(None if state["density"] is None else float(state["density"]))
        self._intervals, self._skip, self._last_time = [], _SKIP_AFTER_SWITCH, None

    def metrics(self) -> dict[str, float]:
        """``auto_density`` (1 for the dense route), ``auto_link_bps`` and ``auto_compute_ms`` of the
        last decision (0 before the first)."""
        return {
            "auto_density": 1.0 if self.density is None else self.density,
            "auto_link_bps": self.last.link_bps if self.last is not None else 0.0,
            "auto_compute_ms": self.compute_s * 1e3,
        }
