"""``torch.profiler.profile`` without the profiler's native log lines.

Starting and stopping the profiler makes its C++ back-end (kineto) write lines such as
``USDT:... SyncActivityProfilerHandler.cpp:39] profiler_start`` straight to file descriptor 2, which no
Python-level setting silences. The benchmarks only read allocation counts from the profiler, so those
lines are noise between their tables: the descriptor is pointed at ``/dev/null`` while the profiler
starts and while it stops, and restored for the profiled code in between (its own warnings and errors
still show).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from torch.profiler import profile

__all__ = ["quiet_profile"]


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


@contextlib.contextmanager
def quiet_profile(**kwargs: Any) -> Iterator[profile]:
    """``with quiet_profile(activities=..., profile_memory=True) as prof:``, like ``profile(...)``."""
    prof = profile(**kwargs)
    with _stderr_to_devnull():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _stderr_to_devnull():
            prof.__exit__(None, None, None)
