"""Two "hosts" on one Linux machine: network namespaces joined by a veth pair, with a rate limit.

Used by ``benchmarks/link/bench_link.py``. Needs root and iproute2 (``ip``, ``tc``). Every command goes
through a *runner* (``argv -> stdout``, raising :class:`CommandError` on failure), so the parsing and
clean-up logic can be tested without root by passing a fake one.

The topology only exists inside the namespaces this module creates::

    namespace <prefix>-a            namespace <prefix>-b
      gmc0 10.77.0.1/24  <-- veth -->  gmc0 10.77.0.2/24
      tc root: tbf rate R            tc root: tbf rate R      (optionally netem delay under it)

Both veth ends carry the same interface name, so one ``GLOO_SOCKET_IFNAME`` serves both hosts. Each
end shapes its own egress, so every direction is limited to ``R``, like a full-duplex link.

Clean-up: :meth:`TwoHostLink.teardown` is idempotent, keeps going when one step fails, ends the
processes still inside *its own* namespaces (by pid) and deletes the namespaces (which deletes the veth
pair). :func:`install_exit_cleanup` runs it from ``atexit`` and from SIGINT/SIGTERM/SIGHUP handlers;
:func:`stale_namespaces` finds namespaces left behind by a run that was killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

Runner = Callable[[Sequence[str]], str]

NAMESPACE_PREFIX = "gmclink"
INTERFACE = "gmc0"
SUBNET = "10.77.0"  # private test subnet; exists only inside the namespaces created here

_INSTALL_HINT = "install iproute2 (Debian/Ubuntu: apt-get install -y iproute2)"


class CommandError(RuntimeError):
    """A command exited with a non-zero status (its stderr is in the message)."""


class LinkSetupError(RuntimeError):
    """The two-host link cannot be built here (not root, no iproute2, no network namespaces)."""


def run_command(argv: Sequence[str]) -> str:
    """Run ``argv`` and return its stdout; raise :class:`CommandError` with its stderr on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


# ------------------------------------------------------------------------------------------- parsing
_RATE_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> float | None:
    """``"none"`` -> None (no limit); ``"100mbit"``, ``"1gbit"``, ``"2.5Gbit"``, ``"10m"`` -> bits/s."""
    t = text.strip().lower()
    if t in ("none", "unlimited", "0", ""):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmg]?)(?:bit|bps|b)?(?:/s)?", t)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"cannot parse rate {text!r}; use e.g. none, 10mbit, 100mbit, 1gbit, 2.5gbit")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def format_rate(bits_per_s: float | None) -> str:
    """The inverse of :func:`parse_rate` for display and for ``tc`` (``1gbit``, ``100mbit``, ``none``)."""
    if bits_per_s is None:
        return "none"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:g}{unit}"
    return f"{bits_per_s:g}bit"


def tbf_burst_bytes(bits_per_s: float) -> int:
    """Token-bucket depth: 4 ms worth of tokens, at least 64 KiB (one GSO segment of a veth, so the
    bucket never has to split one) -- small next to the seconds a benchmark step moves data for."""
    return max(64 * 1024, int(bits_per_s / 8 * 0.004))


def shaping_commands(namespace: str, bits_per_s: float | None, delay_ms: float) -> list[list[str]]:
    """``tc`` commands that (re)configure one veth end's egress: delete the root qdisc, then add
    ``netem delay`` and/or ``tbf rate`` (tbf as netem's child when both)."""
    tc = ["ip", "netns", "exec", namespace, "tc", "qdisc"]
    cmds = [tc + ["del", "dev", INTERFACE, "root"]]
    tbf: list[str] = []
    if bits_per_s is not None:
        tbf = [
            "tbf",
            "rate",
            format_rate(bits_per_s),
            "burst",
            str(tbf_burst_bytes(bits_per_s)),
            "latency",
            "100ms",
        ]
    if delay_ms > 0:
        cmds.append(
            tc + ["add", "dev", INTERFACE, "root", "handle", "1:", "netem", "delay", f"{delay_ms:g}ms"]
        )
        if tbf:
            cmds.append(tc + ["add", "dev", INTERFACE, "parent", "1:", "handle", "2:"] + tbf)
    elif tbf:
        cmds.append(tc + ["add", "dev", INTERFACE, "root", "handle", "1:"] + tbf)
    return cmds


def parse_netns_list(output: str) -> list[str]:
    """Namespace names from ``ip netns list`` (lines like ``name`` or ``name (id: 3)``)."""
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def parse_link_tx_bytes(output: str) -> int:
    """Transmitted bytes from ``ip -s -j link show dev IF`` (JSON; ``stats64`` or ``stats``)."""
    entries = json.loads(output)
    if not entries:
        raise ValueError("ip -j link show returned no interface")
    stats = entries[0].get("stats64") or entries[0].get("stats")
    if stats is None:
        raise ValueError("ip -j link show has no statistics; pass -s")
    return int(stats["tx"]["bytes"])


def parse_pids(output: str) -> list[int]:
    """Process ids from ``ip netns pids NAME`` (one per line)."""
    return [int(tok) for tok in output.split() if tok.isdigit()]


def stale_namespaces(names: Sequence[str], alive: Callable[[int], bool]) -> list[str]:
    """Namespaces ``gmclink-<pid>-{a,b}`` whose creating process no longer exists."""
    stale = []
    for name in names:
        m = re.fullmatch(rf"{NAMESPACE_PREFIX}-(\d+)-[ab]", name)
        if m is not None and not alive(int(m.group(1))):
            stale.append(name)
    return stale


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------- the link
def check_prerequisites(runner: Runner = run_command, euid: int | None = None) -> None:
    """Raise :class:`LinkSetupError` naming the fix when this cannot run: not root, no ``ip``/``tc``,
    or ``ip netns`` unusable (e.g. inside an unprivileged container)."""
    uid = os.geteuid() if euid is None else euid
    if uid != 0:
        raise LinkSetupError(
            "bench_link.py creates network namespaces and must run as root (e.g. sudo -E "
            "python benchmarks/link/bench_link.py ...)"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LinkSetupError(f"'{tool}' not found: {_INSTALL_HINT}")
    try:
        runner(["ip", "netns", "list"])
    except (CommandError, OSError) as err:
        raise LinkSetupError(
            f"'ip netns' is unavailable here ({err}); it needs root in a host or "
            f"privileged container and {_INSTALL_HINT}"
        ) from err


@dataclass
class TwoHostLink:
    """Two namespaces ``<prefix>-a``/``<prefix>-b`` joined by a veth pair (see the module docstring)."""

    prefix: str = field(default_factory=lambda: f"{NAMESPACE_PREFIX}-{os.getpid()}")
    runner: Runner = run_command
    kill: Callable[[int, int], None] = os.kill
    gso: bool = True
    created: list[str] = field(default_factory=list)

    @property
    def namespaces(self) -> tuple[str, str]:
        return (f"{self.prefix}-a", f"{self.prefix}-b")

    @property
    def addresses(self) -> tuple[str, str]:
        return (f"{SUBNET}.1", f"{SUBNET}.2")

    def setup(self) -> None:
        """Create both namespaces, the veth pair, addresses and loopbacks (no rate limit yet)."""
        a, b = self.namespaces
        for ns in (a, b):
            self.runner(["ip", "netns", "add", ns])
            self.created.append(ns)
        self.runner(
            ["ip", "-n", a, "link", "add", INTERFACE, "type", "veth", "peer", "name", INTERFACE, "netns", b]
        )
        for ns, addr in zip(self.namespaces, self.addresses, strict=True):
            self.runner(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", INTERFACE])
            if not self.gso:
                # One MTU-sized frame per packet, as on a physical link (exact per-frame header bytes in
                # the counters, but several times the CPU per byte: on 2 busy cores ~0.3 Gbit/s at most).
                self.runner(
                    ["ip", "-n", ns, "link", "set", INTERFACE, "gso_max_size", "1500", "gso_max_segs", "1"]
                )
            self.runner(["ip", "-n", ns, "link", "set", INTERFACE, "up"])
            self.runner(["ip", "-n", ns, "link", "set", "lo", "up"])

    def shape(self, bits_per_s: float | None, delay_ms: float = 0.0) -> None:
        """Limit each end's egress to ``bits_per_s`` (None: unlimited) with ``delay_ms`` added latency."""
        for ns in self.namespaces:
            first, *rest = shaping_commands(ns, bits_per_s, delay_ms)
            try:
                self.runner(first)  # deleting the root qdisc fails when there is none: fine
            except CommandError:
                pass
            for cmd in rest:
                try:
                    self.runner(cmd)
                except CommandError as err:
                    kind = "netem" if "netem" in cmd else "tbf"
                    if "unknown" not in str(err).lower():
                        raise
                    # The kernel lacks the qdisc module (common in containers, which cannot load one).
                    raise LinkSetupError(
                        f"tc {kind} is not available in this kernel (module sch_{kind}: try "
                        f"'modprobe sch_{kind}' on the host)"
                        + ("; or run without --delay-ms" if kind == "netem" else "")
                    ) from err

    def tx_bytes(self, index: int) -> int:
        """Bytes host ``index`` (0 or 1) has transmitted on its veth end so far."""
        out = self.runner(["ip", "-n", self.namespaces[index], "-s", "-j", "link", "show", "dev", INTERFACE])
        return parse_link_tx_bytes(out)

    def exec_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``index``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[index], *argv]

    def teardown(self) -> list[str]:
        """End what still runs inside our namespaces (by pid), delete them; return the errors met.
        Safe to call more than once and after a partial :meth:`setup`."""
        errors: list[str] = []
        for ns in list(self.created):
            try:
                for pid in parse_pids(self.runner(["ip", "netns", "pids", ns])):
                    try:
                        self.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            except (CommandError, OSError) as err:
                errors.append(str(err))
            try:
                self.runner(["ip", "netns", "del", ns])
            except (CommandError, OSError) as err:
                errors.append(str(err))
            self.created.remove(ns)
        return errors

    def __enter__(self) -> TwoHostLink:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def remove_stale(
    runner: Runner = run_command,
    alive: Callable[[int], bool] = pid_alive,
    kill: Callable[[int, int], None] = os.kill,
) -> list[str]:
    """Tear down namespaces of earlier runs of this benchmark whose process is gone (a SIGKILLed
    run leaves its nodes running inside them; they are ended too); return the names."""
    stale = stale_namespaces(parse_netns_list(runner(["ip", "netns", "list"])), alive)
    if stale:
        TwoHostLink(prefix="stale", runner=runner, kill=kill, created=list(stale)).teardown()
    return stale


def install_exit_cleanup(link: TwoHostLink) -> None:
    """Tear ``link`` down at interpreter exit and on SIGINT/SIGTERM/SIGHUP (which then exit with
    ``128 + signum`` through the normal ``finally`` paths)."""
    atexit.register(link.teardown)

    def handler(signum: int, frame: FrameType | None) -> None:
        link.teardown()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def prepare_link(gso: bool = True) -> TwoHostLink:
    """What every link benchmark does first: check the prerequisites (raises :class:`LinkSetupError`
    naming what is missing), tear down namespaces an earlier run left, and return a link (not yet set
    up) that is torn down at exit and on SIGINT/SIGTERM/SIGHUP. Prints the namespaces it removed."""
    check_prerequisites()
    for ns in remove_stale():
        print(f"removed namespace {ns} left behind by an earlier run")
    link = TwoHostLink(gso=gso)
    install_exit_cleanup(link)
    return link
