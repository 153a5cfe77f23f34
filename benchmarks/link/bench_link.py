"""Where compression pays: DDP vs GMC over a real, rate-limited link between two hosts.

Linux, root, iproute2. Builds two "hosts" as network namespaces joined by a veth pair with addresses
in a private test subnet that only exists inside them (10.77.0.1 and 10.77.0.2, ``benchmarks/link/netns.py``),
limits each direction with ``tc tbf`` (optionally adds ``netem`` delay) and runs one Lightning node per
host (``Trainer(num_nodes=2, devices=1)``, gloo, ``MASTER_ADDR`` on the veth, ``GLOO_SOCKET_IFNAME``
set; ``benchmarks/link/link_node.py``). Nothing is sent to any address outside these namespaces, and they
are deleted on every exit path (``finally``, ``atexit``, SIGINT/SIGTERM/SIGHUP).

``steps`` (default): for each rate, every arm -- DDP, DDP + torch's ``bf16_compress_hook``, GMC with
``topk`` / ``topk_approx`` (/ ``topk_shared`` when the library has it), GMC+ with ``rbgs`` (detach 0.5),
``method="ef"`` when the library has it; all at density 1 % -- trains the MLP (default 64-1024-960-10,
1,060,170 parameters, batch 32 per host) for two run lengths, arms and lengths interleaved in rounds.
Prints per rate: step time and its ratio to DDP's, bytes per step that crossed the link (kernel
counters of the veth ends, marginal over the two run lengths so one-time traffic cancels) and their
ratio to the wire formula; then step time x DDP over all rates and the rate at which each compressed
arm stops paying (see ``link_report.py``).

``tta``: digits, non-IID Dirichlet(0.1) over the 2 hosts (K = 2), DDP vs GMC (``topk_approx`` 1 %) vs
GMC+ (``rbgs`` 1 %, detach 0.5) for the digits CNN and the 1.06M-parameter MLP, per rate: training wall
time to a target test accuracy and the final accuracy (table) and accuracy vs wall time (PNG).

Run (as root, from the repository root)::

    python benchmarks/link/bench_link.py                         # rates none 1gbit 100mbit 10mbit
    python benchmarks/link/bench_link.py --rates none 2gbit 1gbit 500mbit 100mbit
    python benchmarks/link/bench_link.py tta --plot docs/link_tta.png
    python benchmarks/link/bench_link.py --quick                 # 2 rates, short runs (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import link_report  # noqa: E402
import netns  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_LAUNCHER_VARS = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "GLOO_SOCKET_IFNAME",
)
TTA_LABELS = {"ddp": "DDP", "gmc": "GMC topk_approx 1 %", "gmc_plus": "GMC+ rbgs 1 % (detach 0.5)"}


def run_nodes(
    link: netns.TwoHostLink,
    workload_args: list[str],
    out: Path,
    port: int,
    timeout: float,
    log_dir: Path,
    script: str = "link_node.py",
) -> list[dict[str, Any]]:
    """Start one ``benchmarks/link/<script>`` per host, wait for both, return their records (tagged with the
    rank)."""
    base_env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for rank in range(2):
            env = dict(
                base_env,
                MASTER_ADDR=link.addresses[0],
                MASTER_PORT=str(port),
                NODE_RANK=str(rank),
                LOCAL_RANK="0",
                WORLD_SIZE="2",
                GLOO_SOCKET_IFNAME=netns.INTERFACE,
                PYTHONPATH=str(ROOT),
                OMP_NUM_THREADS="1",
            )
            log = (log_dir / f"{out.name}.rank{rank}.log").open("wb")
            logs.append(log)
            argv = [
                sys.executable,
                str(ROOT / "benchmarks" / "link" / script),
                *workload_args,
                "--out",
                str(out),
            ]
            procs.append(
                subprocess.Popen(
                    link.exec_argv(rank, argv), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                )
            )
        deadline = time.monotonic() + timeout
        for rank, p in enumerate(procs):
            try:
                code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as err:
                raise RuntimeError(f"node {rank} did not finish within {timeout:.0f} s") from err
            if code != 0:
                tail = (log_dir / f"{out.name}.rank{rank}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"node {rank} exited with {code}; last output:\n{tail}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    records = []
    for rank in range(2):
        for r in json.loads(Path(f"{out}.rank{rank}.json").read_text()):
            r["rank"] = rank
            records.append(r)
    return records


def header(args: argparse.Namespace) -> str:
    """Machine, load and settings, printed before the results."""
    import torch

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, 1 thread per node; "
        f"load average {load}; delay {args.delay_ms:g} ms per direction; density {args.density:g}; "
        f"veth GSO {'off' if args.no_gso else 'on'}"
    )


def main_steps(args: argparse.Namespace, link: netns.TwoHostLink, tmp: Path) -> dict[str, Any]:
    from link_node import ARMS, available_arms

    present = available_arms()
    arms = [a for a in args.arms if a in present]
    for a in args.arms:
        if a not in present:
            print(
                f"skipping arm {a!r}: method/compressor {ARMS[a][1]}/{ARMS[a][2]} not in this lightning_gmc"
            )
    labels = {a: f"{ARMS[a][0]}{'' if ARMS[a][1] is None else f' {args.density:.0%}'}" for a in arms}
    by_rate: dict[str, dict[str, dict[str, float | None]]] = {}
    bits: dict[str, float | None] = {}
    all_records: dict[str, list[dict[str, Any]]] = {}
    for i, rate_text in enumerate(args.rates):
        rate = netns.parse_rate(rate_text)
        name = netns.format_rate(rate)
        bits[name] = rate
        link.shape(rate, args.delay_ms)
        slow = rate is not None and rate < 50e6
        steps = args.slow_steps if slow else args.steps
        workload = [
            "steps",
            "--arms",
            *arms,
            "--steps",
            *map(str, steps),
            "--repeats",
            str(args.repeats),
            "--dims",
            *map(str, args.dims),
            "--batch",
            str(args.batch),
            "--density",
            str(args.density),
        ]
        t0 = time.perf_counter()
        records = run_nodes(link, workload, tmp / f"steps_{i}", 29500 + i, args.timeout, tmp)
        all_records[name] = records
        by_rate[name] = link_report.summarise_steps(records)
        print(
            f"\n### Link {name} (run lengths {steps[0]} and {steps[1]} steps, {args.repeats} rounds; "
            f"{time.perf_counter() - t0:.0f} s)\n"
        )
        print(link_report.steps_table(by_rate[name], labels))
        sys.stdout.flush()
    print("\n### Step time x DDP (DDP's step time in brackets) over link rates\n")
    print(link_report.sweep_table(by_rate, labels))
    print()
    for arm in arms:
        if arm.startswith("ddp"):
            continue
        pays, not_pays = link_report.crossover(by_rate, bits, arm)
        print(
            f"- {labels[arm]}: faster than DDP at {', '.join(pays) or 'no measured rate'}; "
            f"not faster at {', '.join(not_pays) or 'no measured rate'}"
        )
    return {"summary": by_rate, "records": all_records}


def main_tta(args: argparse.Namespace, link: netns.TwoHostLink, tmp: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for i, rate_text in enumerate(args.tta_rates):
        rate = netns.parse_rate(rate_text)
        link.shape(rate, args.delay_ms)
        workload = [
            "tta",
            "--models",
            *args.models,
            "--epochs",
            str(args.epochs),
            "--density",
            str(args.density),
            "--val-check-interval",
            str(args.val_check_interval),
        ]
        t0 = time.perf_counter()
        records = run_nodes(link, workload, tmp / f"tta_{i}", 29600 + i, args.timeout, tmp)
        print(f"link {netns.format_rate(rate)}: {time.perf_counter() - t0:.0f} s")
        for r in records:
            if r["rank"] == 0:
                r["rate"] = netns.format_rate(rate)
                runs.append(r)
    print(
        f"\n### Time to {' / '.join(f'{100 * t:g} %' for t in args.target)} test accuracy (digits "
        f"non-IID Dirichlet 0.1, 2 hosts, {args.epochs} epochs, evaluated every "
        f"{args.val_check_interval:g} epoch)\n"
    )
    print(link_report.tta_table(runs, args.target, TTA_LABELS))
    if args.plot is not None:
        link_report.plot_tta(runs, args.target, str(args.plot), TTA_LABELS)
        print(f"\nplot: {args.plot}")
    return {"runs": runs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workload", nargs="?", choices=["steps", "tta"], default="steps")
    p.add_argument("--rates", nargs="+", default=["none", "1gbit", "100mbit", "10mbit"])
    p.add_argument("--delay-ms", type=float, default=0.0, help="netem delay added per direction")
    p.add_argument("--arms", nargs="+", default=None, help="default: every arm the library supports")
    p.add_argument("--steps", type=int, nargs=2, default=[10, 40], help="the two run lengths")
    p.add_argument("--slow-steps", type=int, nargs=2, default=[4, 12], help="run lengths below 50 Mbit/s")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds per rate")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 1024, 960, 10])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--tta-rates", nargs="+", default=["100mbit", "1gbit"])
    p.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--val-check-interval", type=float, default=0.25, help="tta: evaluate every this many epochs"
    )
    p.add_argument("--target", type=float, nargs="+", default=[0.9, 0.95], help="test accuracies to time")
    p.add_argument("--plot", type=Path, default=None, help="tta: write accuracy vs wall time here (PNG)")
    p.add_argument("--json", type=Path, default=None, help="also write summaries and raw records here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per pair of node processes")
    p.add_argument(
        "--no-gso",
        action="store_true",
        help="one MTU frame per packet on the veth (exact header bytes, much more CPU per byte)",
    )
    p.add_argument("--quick", action="store_true", help="rates none and 100mbit, short runs, 1 round")
    args = p.parse_args(argv)
    from link_node import DEFAULT_ARMS

    if args.arms is None:
        args.arms = list(DEFAULT_ARMS)
    if args.quick:
        args.rates, args.tta_rates = ["none", "100mbit"], ["100mbit"]
        args.steps, args.slow_steps, args.repeats, args.epochs = [3, 8], [2, 4], 1, 2
    for r in args.rates + args.tta_rates:
        netns.parse_rate(r)  # fail on a typo before building anything
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        link = netns.prepare_link(gso=not args.no_gso)
    except netns.LinkSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(header(args))
    print(f"command: python benchmarks/link/bench_link.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    sys.stdout.flush()
    with link, tempfile.TemporaryDirectory(prefix="bench_link_") as tmp_name:
        try:
            result = (main_steps if args.workload == "steps" else main_tta)(args, link, Path(tmp_name))
        except netns.LinkSetupError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
