"""The benchmarks' shared timing harness: arms timed in interleaved rounds, medians and ratios.

Every timing benchmark here compares variants ("arms") measured side by side on a machine that other
jobs share. Each round runs every arm once, in order, so that load drift hits all arms alike; the
first ``warmup`` rounds are not recorded; what a benchmark reports is the median per arm and its
ratio to a reference arm of the same run (a ``copy_`` of the gradient, plain DDP, ...)::

    arms = [Arm("copy_", lambda: dst.copy_(src)), Arm("GMC", step)]
    samples = interleaved(arms, rounds=9, warmup=1, device=device)
    med = medians(samples)
    print(med["GMC"] / med["copy_"])

On an accelerator each call is timed with ``torch.utils.benchmark.timer``, which waits for the work
queued on the device before reading the clock; on CPU with ``time.perf_counter``, or with the
process's CPU time (``cpu_time=True``, ``time.process_time``: every thread of the process, not the
time it waited for a core), which stays put when other jobs load the machine and wall-clock ratios
scatter; it leaves out what a process waits for (another rank, a socket), so it suits one-process
benchmarks.
``torch.utils.benchmark.Timer`` itself does not fit here: it runs the statement several times per
measurement (warm-up calls included), where a training step must run exactly once per round.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from quiet_profiler import quiet_profile
from torch.profiler import ProfilerActivity

__all__ = [
    "Arm",
    "clock",
    "free_port",
    "interleaved",
    "large_allocations",
    "large_ops",
    "load_average",
    "medians",
]

#: Per arm name, the recorded seconds of each measured round.
Samples = dict[str, list[float]]


@dataclass
class Arm:
    """One timed variant.

    Attributes:
        name: the label its samples are recorded under (unique within a run).
        run: the timed call.
        setup: untimed, right before every call (e.g. restore the input the call consumes, or a
            barrier so that every rank starts together).
        after: untimed, right after every call, with whether the round is measured (e.g. read the
            traffic counters of the step).
    """

    name: str
    run: Callable[[], object]
    setup: Callable[[], object] | None = None
    after: Callable[[bool], object] | None = None


def clock(device: torch.device | str = "cpu", cpu_time: bool = False) -> Callable[[], float]:
    """Seconds from a monotonic clock that, on an accelerator, first waits for the queued work; with
    ``cpu_time``, the CPU seconds of this process (CPU only)."""
    if cpu_time:
        if torch.device(device).type != "cpu":
            raise ValueError(f"cpu_time measures CPU work; the arms run on {device}")
        return time.process_time
    if torch.device(device).type == "cpu":
        return time.perf_counter
    # Imported here: torch.utils.benchmark imports cpp_extension, which logs a line about CUDA_HOME on
    # machines without CUDA.
    from torch.utils.benchmark import timer

    return timer


def interleaved(
    arms: Sequence[Arm],
    rounds: int,
    warmup: int = 1,
    *,
    device: torch.device | str = "cpu",
    cpu_time: bool = False,
    before_round: Callable[[int], object] | None = None,
    combine: Callable[[float], float] | None = None,
) -> Samples:
    """Run ``warmup + rounds`` rounds of every arm once each, in order; return the measured seconds.

    Args:
        arms: the variants, each called once per round.
        rounds: recorded rounds.
        warmup: unrecorded rounds first (allocations, DDP's bucket rebuild, caches).
        device: where the arms run (selects the :func:`clock`).
        cpu_time: time the process's CPU seconds instead of wall-clock seconds (CPU only).
        before_round: called with the round index (warm-up rounds included) before the round's
            first arm (e.g. to pick the round's batch).
        combine: applied to every call's seconds before they are recorded; in a multi-process
            benchmark, the maximum over ranks (a collective: every rank must time the same arms).
    """
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    now = clock(device, cpu_time)
    samples: Samples = {name: [] for name in names}
    for r in range(warmup + rounds):
        if before_round is not None:
            before_round(r)
        measured = r >= warmup
        for arm in arms:
            if arm.setup is not None:
                arm.setup()
            start = now()
            arm.run()
            seconds = now() - start
            if combine is not None:
                seconds = combine(seconds)
            if measured:
                samples[arm.name].append(seconds)
            if arm.after is not None:
                arm.after(measured)
    return samples


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median seconds per arm."""
    return {name: statistics.median(values) for name, values in samples.items()}


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages, for the lines before and after a table."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def large_allocations(fn: Callable[[], object], min_bytes: int) -> tuple[int, float]:
    """Ops in one call of ``fn`` whose own net CPU allocation is at least ``min_bytes``, and the MiB
    all ops allocated (net, per op).

    Uses the profiler's memory tracking; a temporary allocated and freed inside one op (e.g. the
    internal queue of ``torch.topk``) nets to zero and is not counted.
    """
    with quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.name != "[memory]"]
    large = sum(1 for e in events if e.self_cpu_memory_usage >= min_bytes)
    total = sum(e.self_cpu_memory_usage for e in events if e.self_cpu_memory_usage > 0)
    return large, total / 2**20


def large_ops(fn: Callable[[], object], min_numel: int) -> list[str]:
    """The innermost ops of one call of ``fn`` that read or write a tensor of at least ``min_numel``
    elements, in order: the passes over gradient-sized buffers, counted independently of the load.
    Views (``slice``, ``view``, ...) and checks that return no tensor move no data and are left out;
    an op whose work a nested op does (``zero_`` running ``fill_``) counts once, as the nested op."""

    def touches(event: Any) -> bool:
        return not _moves_no_data(event.name) and any(
            math.prod(shape) >= min_numel for shape in event.input_shapes if shape
        )

    def inner(event: Any) -> bool:
        return touches(event) or any(inner(child) for child in event.cpu_children)

    with quiet_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [
        e.name for e in prof.events() if touches(e) and not any(inner(child) for child in e.cpu_children)
    ]


def _moves_no_data(name: str) -> bool:
    """Whether every overload of the aten op that takes a tensor first returns only views of its
    inputs (the schema's returns alias, unwritten) or no tensor at all (a check such as
    ``_has_compatible_shallow_copy_type``)."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None) if name.startswith("aten::") else None
    if packet is None:
        return False
    schemas = [getattr(packet, overload)._schema for overload in packet.overloads()]
    schemas = [s for s in schemas if s.arguments and isinstance(s.arguments[0].type, torch.TensorType)]
    return bool(schemas) and all(
        all(r.alias_info is not None and not r.alias_info.is_write for r in s.returns)
        or not any(isinstance(r.type, torch.TensorType) for r in s.returns)
        for s in schemas
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a benchmark's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
