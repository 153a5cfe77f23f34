"""The link benchmark's helpers without root: command building, parsing, clean-up on every path, and
the marginal-bytes arithmetic (benchmarks/link/netns.py, benchmarks/link/link_report.py). The
measurement itself is a benchmark (benchmarks/link/bench_link.py), not a test."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "link"))

import link_report  # noqa: E402
import netns  # noqa: E402


class FakeRunner:
    """Records every command; answers from ``replies`` (first matching prefix) or fails on ``fail``."""

    def __init__(
        self, replies: dict[tuple[str, ...], str] | None = None, fail: Sequence[tuple[str, ...]] = ()
    ) -> None:
        self.calls: list[list[str]] = []
        self.replies = replies or {}
        self.fail = list(fail)

    def __call__(self, argv: Sequence[str]) -> str:
        argv = list(argv)
        self.calls.append(argv)
        for prefix in self.fail:
            if tuple(argv[: len(prefix)]) == prefix:
                raise netns.CommandError(
                    f"{' '.join(argv)} exited with 1: RTNETLINK answers: Operation not permitted"
                )
        for prefix, out in self.replies.items():
            if tuple(argv[: len(prefix)]) == prefix:
                return out
        return ""


@pytest.mark.parametrize(
    ("text", "bits"),
    [("none", None), ("100mbit", 100e6), ("1gbit", 1e9), ("2.5Gbit", 2.5e9), ("10m", 10e6), ("500kbit", 5e5)],
)
def test_parse_and_format_rate_round_trip(text: str, bits: float | None) -> None:
    assert netns.parse_rate(text) == bits
    assert netns.parse_rate(netns.format_rate(bits)) == bits


@pytest.mark.parametrize("bad", ["fast", "-1mbit", "0.0gbit", "10 tbit"])
def test_parse_rate_rejects_nonsense_naming_examples(bad: str) -> None:
    with pytest.raises(ValueError, match="100mbit"):
        netns.parse_rate(bad)


def test_shaping_commands_tbf_netem_and_none() -> None:
    tbf = netns.shaping_commands("ns-a", 100e6, 0.0)
    assert tbf[0] == ["ip", "netns", "exec", "ns-a", "tc", "qdisc", "del", "dev", "gmc0", "root"]
    assert tbf[1][6:] == [
        "add",
        "dev",
        "gmc0",
        "root",
        "handle",
        "1:",
        "tbf",
        "rate",
        "100mbit",
        "burst",
        "65536",
        "latency",
        "100ms",
    ]
    both = netns.shaping_commands("ns-a", 1e9, 5.0)
    assert "netem" in both[1] and both[1][both[1].index("delay") + 1] == "5ms"
    assert both[2][6:10] == ["add", "dev", "gmc0", "parent"] and "tbf" in both[2]
    # 1 Gbit/s: 4 ms of tokens = 500 kB, above the 64 KiB floor.
    assert both[2][both[2].index("burst") + 1] == str(500_000)
    assert netns.shaping_commands("ns-a", None, 0.0)[1:] == []  # unlimited: only the delete


def test_parse_ip_outputs() -> None:
    assert netns.parse_netns_list("gmclink-12-b (id: 1)\ngmclink-12-a (id: 0)\nother\n\n") == [
        "gmclink-12-b",
        "gmclink-12-a",
        "other",
    ]
    assert netns.parse_pids("123\n456\n") == [123, 456]
    stats = [{"ifname": "gmc0", "stats64": {"rx": {"bytes": 5}, "tx": {"bytes": 987654321}}}]
    assert netns.parse_link_tx_bytes(json.dumps(stats)) == 987654321
    assert netns.parse_link_tx_bytes(json.dumps([{"stats": {"tx": {"bytes": 7}}}])) == 7
    with pytest.raises(ValueError, match="-s"):
        netns.parse_link_tx_bytes(json.dumps([{"ifname": "gmc0"}]))


def test_stale_namespaces_only_ours_with_dead_owner() -> None:
    names = ["gmclink-100-a", "gmclink-100-b", "gmclink-200-a", "gmclinkx-100-a", "gmclink-100-c", "mine"]
    assert netns.stale_namespaces(names, alive=lambda pid: pid == 200) == ["gmclink-100-a", "gmclink-100-b"]
    runner = FakeRunner(
        {
            ("ip", "netns", "list"): "gmclink-100-a (id: 0)\ngmclink-200-b\n",
            ("ip", "netns", "pids", "gmclink-100-a"): "77\n",
        }
    )
    killed: list[int] = []
    removed = netns.remove_stale(runner, alive=lambda pid: pid == 200, kill=lambda p, s: killed.append(p))
    assert removed == ["gmclink-100-a"]
    assert killed == [77]  # the orphaned node left inside it
    assert runner.calls[-1] == ["ip", "netns", "del", "gmclink-100-a"]
    assert not any("gmclink-200-b" in c for c in runner.calls[1:])


def test_setup_builds_the_private_link_inside_the_namespaces() -> None:
    runner = FakeRunner()
    link = netns.TwoHostLink(prefix="gmclink-7", runner=runner)
    link.setup()
    assert link.created == ["gmclink-7-a", "gmclink-7-b"]
    assert [
        "ip",
        "-n",
        "gmclink-7-a",
        "link",
        "add",
        "gmc0",
        "type",
        "veth",
        "peer",
        "name",
        "gmc0",
        "netns",
        "gmclink-7-b",
    ] in runner.calls
    assert ["ip", "-n", "gmclink-7-a", "addr", "add", "10.77.0.1/24", "dev", "gmc0"] in runner.calls
    assert ["ip", "-n", "gmclink-7-b", "addr", "add", "10.77.0.2/24", "dev", "gmc0"] in runner.calls
    # Every command after the two "netns add" runs inside one of our namespaces.
    for call in runner.calls[2:]:
        assert call[:3] in (["ip", "-n", "gmclink-7-a"], ["ip", "-n", "gmclink-7-b"])
    assert link.exec_argv(1, ["python", "x.py"]) == ["ip", "netns", "exec", "gmclink-7-b", "python", "x.py"]


def test_shape_ignores_missing_root_qdisc_but_not_other_failures() -> None:
    runner = FakeRunner(fail=[("ip", "netns", "exec", "gmclink-7-a", "tc", "qdisc", "del")])
    link = netns.TwoHostLink(prefix="gmclink-7", runner=runner)
    link.shape(10e6)
    assert sum("tbf" in c for c in runner.calls) == 2  # both ends shaped
    bad = FakeRunner(fail=[("ip", "netns", "exec", "gmclink-7-b", "tc", "qdisc", "add")])
    with pytest.raises(netns.CommandError):
        netns.TwoHostLink(prefix="gmclink-7", runner=bad).shape(10e6)


def test_teardown_kills_our_processes_deletes_both_and_is_idempotent() -> None:
    runner = FakeRunner(
        {("ip", "netns", "pids", "gmclink-7-a"): "41\n42\n"}, fail=[("ip", "netns", "del", "gmclink-7-a")]
    )
    killed: list[tuple[int, int]] = []
    link = netns.TwoHostLink(prefix="gmclink-7", runner=runner, kill=lambda p, s: killed.append((p, s)))
    link.setup()
    errors = link.teardown()
    assert killed == [(41, signal.SIGKILL), (42, signal.SIGKILL)]
    # The failed delete of the first namespace is reported, and the second one is still deleted.
    assert len(errors) == 1 and "gmclink-7-a" in errors[0]
    assert ["ip", "netns", "del", "gmclink-7-b"] in runner.calls
    n = len(runner.calls)
    assert link.teardown() == [] and len(runner.calls) == n


def test_context_manager_cleans_up_on_error_and_after_partial_setup() -> None:
    runner = FakeRunner()
    link = netns.TwoHostLink(prefix="gmclink-7", runner=runner)
    with pytest.raises(RuntimeError, match="boom"), link:
        raise RuntimeError("boom")
    assert link.created == []
    assert [c for c in runner.calls if c[:3] == ["ip", "netns", "del"]] == [
        ["ip", "netns", "del", "gmclink-7-a"],
        ["ip", "netns", "del", "gmclink-7-b"],
    ]
    # The veth creation fails: the namespace already made is deleted, and the error propagates.
    partial = FakeRunner(fail=[("ip", "-n", "gmclink-8-a", "link", "add")])
    with pytest.raises(netns.CommandError), netns.TwoHostLink(prefix="gmclink-8", runner=partial):
        pass
    assert ["ip", "netns", "del", "gmclink-8-a"] in partial.calls
    assert ["ip", "netns", "del", "gmclink-8-b"] in partial.calls


def test_exit_cleanup_runs_on_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    handlers: dict[int, object] = {}
    registered: list[object] = []
    monkeypatch.setattr(netns.signal, "signal", lambda sig, h: handlers.__setitem__(sig, h))
    monkeypatch.setattr(netns.atexit, "register", registered.append)
    runner = FakeRunner()
    link = netns.TwoHostLink(prefix="gmclink-9", runner=runner)
    link.setup()
    netns.install_exit_cleanup(link)
    assert registered == [link.teardown]
    assert set(handlers) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    with pytest.raises(SystemExit) as exc:
        handlers[signal.SIGTERM](signal.SIGTERM, None)  # type: ignore[operator]
    assert exc.value.code == 128 + signal.SIGTERM
    assert link.created == [] and ["ip", "netns", "del", "gmclink-9-b"] in runner.calls


def test_prerequisites_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(netns.LinkSetupError, match="must run as root"):
        netns.check_prerequisites(FakeRunner(), euid=1000)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    with pytest.raises(netns.LinkSetupError, match="apt-get install -y iproute2"):
        netns.check_prerequisites(FakeRunner(), euid=0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    with pytest.raises(netns.LinkSetupError, match="'ip netns' is unavailable"):
        netns.check_prerequisites(FakeRunner(fail=[("ip", "netns")]), euid=0)
    netns.check_prerequisites(FakeRunner(), euid=0)  # all present: no error


def _rec(
    arm: str, rank: int, repeat: int, steps: int, tx: float, gmc: float | None = None
) -> dict[str, object]:
    return {
        "arm": arm,
        "rank": rank,
        "repeat": repeat,
        "steps": steps,
        "tx_bytes": tx,
        "params": 1000,
        "gmc_bytes_sent_total": gmc,
        "step_s": [9.0] + [0.1 * (1 + rank)] * (steps - 2),
    }


def test_marginal_bytes_cancel_one_time_traffic_and_formulas() -> None:
    # Each fit sends a 5000-byte broadcast once, then 4100 bytes per step (rank 0) / 4300 (rank 1).
    recs = [
        _rec("ddp", rank, rep, n, 5000 + (4100 + 200 * rank) * n)
        for rank in (0, 1)
        for rep in (0, 1)
        for n in (10, 40)
    ]
    recs += [_rec("gmc_x", rank, 0, n, 5000 + 90 * n, gmc=85.0 * n) for rank in (0, 1) for n in (10, 40)]
    s = link_report.summarise_steps(recs)
    assert s["ddp"]["link_bytes"] == pytest.approx(4200.0)
    assert s["ddp"]["formula_bytes"] == pytest.approx(2 * (2 - 1) / 2 * 4 * 1000)  # ring all-reduce, K = 2
    assert s["gmc_x"]["link_bytes"] == pytest.approx(90.0)
    assert s["gmc_x"]["formula_bytes"] == pytest.approx(85.0)
    # The first interval of every fit (DDP's bucket rebuild, here 9 s) is not a steady-state step.
    assert s["ddp"]["step_s"] == pytest.approx(0.15)
    table = link_report.steps_table(s, {"ddp": "DDP"})
    assert "| DDP | 150.0 | 1.000 | 4,200 | 4,000 | 1.050 | 1.0000 |" in table


def test_crossover_splits_rates_where_compression_pays() -> None:
    bits = {"none": None, "1gbit": 1e9, "100mbit": 1e8, "10mbit": 1e7}
    step = {"none": (0.05, 0.08), "1gbit": (0.09, 0.08), "100mbit": (0.4, 0.09), "10mbit": (3.5, 0.1)}
    by_rate = {r: {"ddp": {"step_s": d}, "gmc": {"step_s": g}} for r, (d, g) in step.items()}
    assert link_report.crossover(by_rate, bits, "gmc") == (["10mbit", "100mbit", "1gbit"], ["none"])
    assert link_report.time_to_target([(1.0, 0.5), (2.0, 0.91), (3.0, 0.89)], 0.9) == 2.0
    assert link_report.time_to_target([(1.0, 0.5)], 0.9) is None


def test_tta_table_times_each_target_against_ddp_on_the_same_link() -> None:
    runs = [
        {
            "model": "mlp",
            "rate": "100mbit",
            "method": "ddp",
            "params": 10,
            "steps": 4,
            "points": [(10.0, 0.85), (20.0, 0.92), (30.0, 0.96)],
        },
        {
            "model": "mlp",
            "rate": "100mbit",
            "method": "gmc",
            "params": 10,
            "steps": 4,
            "points": [(2.0, 0.91), (4.0, 0.93)],
        },
    ]
    table = link_report.tta_table(runs, [0.9, 0.95], {"gmc": "GMC"})
    assert "| mlp (10 params) | 100mbit | GMC | 2.0 s (0.10) | never | 93.0 % | 4.0 s | 4 |" in table
    assert (
        "| mlp (10 params) | 100mbit | ddp | 20.0 s (1.00) | 30.0 s (1.00) | 96.0 % | 30.0 s | 4 |" in table
    )


def test_missing_netem_module_is_a_setup_error_naming_the_fix() -> None:
    class NoNetem(FakeRunner):
        def __call__(self, argv: Sequence[str]) -> str:
            if "netem" in argv:
                self.calls.append(list(argv))
                raise netns.CommandError("tc ... exited with 2: Error: Specified qdisc kind is unknown.")
            return super().__call__(argv)

    link = netns.TwoHostLink(prefix="gmclink-7", runner=NoNetem())
    with pytest.raises(netns.LinkSetupError, match="sch_netem.*without --delay-ms"):
        link.shape(100e6, delay_ms=5.0)
    link.shape(100e6)  # without delay: tbf only, no error
