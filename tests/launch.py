"""Starting processes from a test: the one place that does it.

* :func:`launch_ranks` starts every rank itself, as torchrun does: each process gets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK`` (and torchrun's ``GROUP_RANK``),
  ``MASTER_ADDR`` and ``MASTER_PORT``; ``ranks_per_node`` consecutive ranks form a node.
* :func:`launch_nodes` starts one process per node with ``NODE_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT`` set, as a cluster scheduler does, and Lightning (or Fabric) starts the node's other
  ranks. :func:`run_script` is its one-node case: a training script as a user runs it, which
  Lightning turns into ``devices`` ranks on a port it picks.

``argv`` is a Python script and its arguments, run by this interpreter. Every process starts from
this process's environment without the launcher variables (an enclosing launcher's, or those an
in-process Trainer of an earlier test wrote; ``conftest.py`` restores ``os.environ`` after each test,
and a leftover ``LOCAL_RANK`` would make Lightning believe its ranks already exist), with
``OMP_NUM_THREADS=1`` (two cores are shared by every rank) and ``PYTHONPATH`` = the repository and
``tests/`` (scripts import ``helpers``; planted-bug runs put their scratch copy there), plus ``env``.

Each process runs in its own process group, so that the ranks Lightning starts belong to it, and
writes its output to files. One deadline covers the launch: a launch still running past it has every
process of every group killed and fails, and so does, with ``check=True``, a process that exits
non-zero. The error names each process (``rank 1``, ``node 0``) with its exit status, the error lines
of its output and the tail of its stdout and stderr. After the processes started here exit, the launch
waits (within the deadline) for the ranks they started, so that every rank's result file is written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)

Argv = Sequence[object]
"""A script and its arguments (each passed as ``str(arg)``)."""


@dataclass(frozen=True)
class Finished:
    """One process of a launch, after it exited."""

    name: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class LaunchError(AssertionError):
    """A launch that hung or failed; an AssertionError, so the test reads as failed, not errored."""


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment as a launch starts from it; ``env`` adds variables (``None``
    removes one)."""
    out = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    out["PYTHONPATH"] = os.pathsep.join((str(REPO), str(TESTS)))
    out["OMP_NUM_THREADS"] = "1"
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def launch_ranks(
    argv: Argv,
    world_size: int,
    *,
    ranks_per_node: int | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 240.0,
    check: bool = True,
) -> list[Finished]:
    """Start ``world_size`` ranks of ``argv`` (torchrun's environment); return them in rank order."""
    per_node = ranks_per_node or world_size
    if world_size % per_node:
        raise ValueError(f"{world_size} ranks do not split into nodes of {per_node}")
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [
        {
            **rendezvous,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank % per_node),
            "LOCAL_WORLD_SIZE": str(per_node),
            "NODE_RANK": str(rank // per_node),
            "GROUP_RANK": str(rank // per_node),
        }
        for rank in range(world_size)
    ]
    return _run(argv, {f"rank {r}": own for r, own in enumerate(ranks)}, cwd, env, timeout, check)


def launch_nodes(
    argv: Argv,
    num_nodes: int,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 240.0,
    check: bool = True,
) -> list[Finished]:
    """Start ``argv`` once per node with ``NODE_RANK`` set (Lightning starts each node's other
    ranks); return the processes in node order. One node: no rendezvous variables, as on a laptop."""
    if num_nodes == 1:
        return _run(argv, {"node 0": {}}, cwd, env, timeout, check)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = {f"node {n}": {**rendezvous, "NODE_RANK": str(n)} for n in range(num_nodes)}
    return _run(argv, nodes, cwd, env, timeout, check)


def run_script(
    argv: Argv,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 240.0,
    check: bool = True,
) -> Finished:
    """Run ``argv`` as one process (which may start ranks of its own) and return it."""
    (finished,) = launch_nodes(argv, 1, cwd=cwd, env=env, timeout=timeout, check=check)
    return finished


# ------------------------------------------------------------------------------------- running
@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    stdout: IO[bytes]
    stderr: IO[bytes]

    def read(self, stream: IO[bytes]) -> str:
        stream.seek(0)
        return stream.read().decode(errors="replace")


def _run(
    argv: Argv,
    processes: Mapping[str, Mapping[str, str]],
    cwd: Path | None,
    env: Mapping[str, str | None] | None,
    timeout: float,
    check: bool,
) -> list[Finished]:
    command = [sys.executable, *(str(a) for a in argv)]
    base = clean_env(env)
    deadline = time.monotonic() + timeout
    started: list[_Process] = []
    ended: set[str] = set()  # processes whose whole group has exited
    with contextlib.ExitStack() as files:
        try:
            for name, own in processes.items():
                out = files.enter_context(tempfile.TemporaryFile())
                err = files.enter_context(tempfile.TemporaryFile())
                popen = subprocess.Popen(
                    command, cwd=cwd, env={**base, **own}, stdout=out, stderr=err, start_new_session=True
                )
                started.append(_Process(name, popen, out, err))
            hung = [p.name for p in started if not _wait(p.popen, deadline)]
            if not hung:  # the ranks Lightning started may still be writing their results
                for p in started:
                    if _wait_group(p.popen.pid, deadline):
                        ended.add(p.name)
                    else:
                        hung.append(f"the ranks {p.name} started")
        finally:
            for p in started:
                if p.name not in ended:
                    _kill_group(p.popen)
        finished = [Finished(p.name, p.popen.returncode, p.read(p.stdout), p.read(p.stderr)) for p in started]
    if hung:
        raise LaunchError(
            f"{_describe(command)}: {', '.join(hung)} still running after {timeout:.0f} s; every "
            f"process was killed\n{_report(finished)}"
        )
    if check and any(f.returncode != 0 for f in finished):
        raise LaunchError(f"{_describe(command)} failed\n{_report(finished)}")
    return finished


def _wait(popen: subprocess.Popen[bytes], deadline: float) -> bool:
    try:
        popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies excluded; Linux ``/proc``)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _wait_group(pgid: int, deadline: float) -> bool:
    if not Path("/proc/self/stat").exists():
        return True  # no /proc: trust the processes started here
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_group(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL to every process of the group; returns once they are gone (or after 10 s)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=10)
    _wait_group(popen.pid, time.monotonic() + 10)
    if popen.returncode is None:  # unkillable: report it as such rather than wait forever
        popen.returncode = -int(signal.SIGKILL)


def _describe(command: Sequence[str]) -> str:
    return "launch of `" + " ".join(Path(c).name if i < 2 else c for i, c in enumerate(command)) + "`"


def _report(finished: Sequence[Finished], stdout_tail: int = 3000, stderr_tail: int = 6000) -> str:
    """Per process: exit status, its error lines, and the tails of its stdout and stderr."""
    parts = []
    for f in finished:
        errors = [ln for ln in f.output.splitlines() if "Error" in ln or "error" in ln or "Traceback" in ln]
        parts.append(f"===== {f.name}: exit status {f.returncode} =====")
        if errors:
            parts.append("--- error lines (last 20) ---\n" + "\n".join(errors[-20:]))
        parts.append(f"--- stdout (last {stdout_tail} characters) ---\n{f.stdout[-stdout_tail:]}")
        parts.append(f"--- stderr (last {stderr_tail} characters) ---\n{f.stderr[-stderr_tail:]}")
    return "\n".join(parts)
