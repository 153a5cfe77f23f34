"""Does the planner predict the link benchmark? And is density="auto" within 10 % of the best setting?

Linux, root (network namespaces, ``tc``; see ``benchmarks/link/netns.py`` and ``docs/link.md``). Two hosts
joined by a rate-limited veth, one Lightning node each (``Trainer(num_nodes=2, devices=1)``, gloo,
the MLP 64-1024-960-10 of ``bench_link.py``), K = 2. One command produces both tables:

1. **validate** (rates of ``docs/link.md``: none, 1gbit, 100mbit, 10mbit): first both hosts calibrate
   at once (``plan_node.py calibrate``: the planner's device profile, and the MLP's compute per step,
   with the CPUs shared as in a run); per rate the link is probed (a gloo all-reduce of known size:
   latency, and the bare veth's rate), every arm of ``bench_link.py`` runs (interleaved rounds, two run
   lengths), and the planner predicts each arm's step from the profile, the compute time, the nominal
   rate (the probed one for the unshaped veth) and the probed latency. The table compares the ratio to
   DDP's step, predicted and measured (goal: within 25 %).
2. **auto** (100mbit, 1gbit, none): DDP, fixed GMC ``topk_approx`` 1 % and 10 %, GMC+ ``rbgs`` 1 %,
   GMC's dense route (what auto falls back to) and the same two compressors with ``density="auto"``,
   interleaved; each auto arm's step over the best of DDP and the fixed arms (goal: <= 1.1), and what
   auto chose.

Run (as root, from the repository root)::

    python benchmarks/link/bench_plan_link.py                  # both tables (about 20 minutes)
    python benchmarks/link/bench_plan_link.py --quick          # a smoke test: 2 rates, short runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_link  # noqa: E402
import link_report  # noqa: E402
import netns  # noqa: E402
from link_node import ARM_DENSITY, ARMS, DEFAULT_ARMS  # noqa: E402

from lightning_gmc.plan import Arm, Cluster, DeviceProfile, ddp_buckets, plan  # noqa: E402
from lightning_gmc.plan.cost import TCP_ETHERNET_EFFICIENCY  # noqa: E402

AUTO_ARMS = [
    "ddp",
    "gmc_topk_approx",
    "gmc_topk_approx_10",
    "gmc_plus_rbgs",
    "gmc_dense",
    "gmc_topk_approx_auto",
    "gmc_plus_rbgs_auto",
]


def planner_arm(arm: str, density: float) -> Arm:
    """The planner's :class:`Arm` of a ``link_node.py`` arm."""
    _, method, compressor, detach = ARMS[arm]
    if method is None:
        return Arm("ddp_bf16" if compressor == "bf16" else "ddp")
    chosen = ARM_DENSITY.get(arm, density)
    return Arm(method, str(compressor), float(chosen), float(detach or 0.0))


def mlp_numels(dims: list[int]) -> list[int]:
    numels = []
    for a, b in zip(dims, dims[1:], strict=False):
        numels += [a * b, b]
    return numels


def label(arm: str, density: float) -> str:
    name, method, _, _ = ARMS[arm]
    chosen = ARM_DENSITY.get(arm, density)
    shown = method is not None and chosen != "auto" and ARMS[arm][2] != "none"
    return f"{name} {float(chosen):.0%}" if shown else name


def calibrate_hosts(
    link: netns.TwoHostLink, args: argparse.Namespace, tmp: Path, tag: str = ""
) -> tuple[DeviceProfile, float]:
    workload = ["calibrate", "--dims", *map(str, args.dims), "--batch", str(args.batch)]
    workload += ["--min-run-time", str(args.min_run_time)]
    records = bench_link.run_nodes(
        link, workload, tmp / f"calibrate{tag}", 29450, args.timeout, tmp, "plan_node.py"
    )
    profile = DeviceProfile.from_mapping(records[0]["profile"])
    compute = statistics.fmean(r["compute_s"] for r in records)
    bare = statistics.fmean(r["bare_compute_s"] for r in records)
    print(f"compute per step: a single-device Trainer step {compute * 1e3:.1f} ms (bare {bare * 1e3:.1f} ms)")
    return profile, compute


def probe(
    link: netns.TwoHostLink, rate: float | None, args: argparse.Namespace, tmp: Path, index: int
) -> dict[str, Any]:
    seconds = 0.05 if args.quick else 0.2
    nbytes = 16 << 20 if rate is None else int(min(16 << 20, max(64 << 10, rate * seconds / 8)))
    workload = ["probe", "--probe-bytes", str(nbytes), "--probe-repeats", "3" if args.quick else "5"]
    records = bench_link.run_nodes(
        link, workload, tmp / f"probe_{index}", 29470 + index, args.timeout, tmp, "plan_node.py"
    )
    return {
        key: max(r[key] for r in records) if key != "link_bps" else min(r[key] for r in records)
        for key in records[0]
        if key != "rank"
    }


def run_steps(
    link: netns.TwoHostLink, arms: list[str], args: argparse.Namespace, tmp: Path, tag: str
) -> list[dict[str, Any]]:
    workload = ["steps", "--arms", *arms, "--steps", *map(str, args.steps), "--repeats", str(args.repeats)]
    workload += ["--dims", *map(str, args.dims), "--batch", str(args.batch), "--density", str(args.density)]
    port = 29500 + abs(hash(tag)) % 400
    return bench_link.run_nodes(link, workload, tmp / f"steps_{tag}", port, args.timeout, tmp)


def predictions(
    profile: DeviceProfile,
    compute_s: float,
    bps: float,
    measured_rate: bool,
    latency_s: float,
    arms: list[str],
    args: argparse.Namespace,
) -> dict[str, float]:
    numels = mlp_numels(args.dims)
    cluster = Cluster(
        nodes=2,
        ranks_per_node=1,
        inter_bps=bps,
        inter_latency_s=0.0,
        efficiency=1.0 if measured_rate else TCP_ETHERNET_EFFICIENCY,
    )
    measured = replace(profile, collective_latency_s=latency_s)
    wanted = [planner_arm(a, args.density) for a in arms]
    out = plan(numels, cluster, compute_s, measured, wanted, ddp_buckets(numels))
    by_label = {p.arm: p.step_s for p in out}
    return {a: by_label[planner_arm(a, args.density)] for a in arms}


def validate(
    link: netns.TwoHostLink, args: argparse.Namespace, tmp: Path, profile: DeviceProfile, compute_s: float
) -> dict[str, Any]:
    arms = [a for a in DEFAULT_ARMS if a in args.arms]
    rows, result = [], {}
    for index, rate_text in enumerate(args.rates):
        rate = netns.parse_rate(rate_text)
        name = netns.format_rate(rate)
        if args.recalibrate and index > 0:  # on a shared machine the load drifts between rates
            profile, compute_s = calibrate_hosts(link, args, tmp, f"_{index}")
        link.shape(rate)
        t0 = time.perf_counter()
        link_probe = probe(link, rate, args, tmp, index)
        summary = link_report.summarise_steps(run_steps(link, arms, args, tmp, f"v{index}"))
        bps = link_probe["link_bps"] if rate is None else rate
        predicted = predictions(profile, compute_s, bps, rate is None, link_probe["latency_s"], arms, args)
        ddp_measured, ddp_predicted = summary["ddp"]["step_s"], predicted["ddp"]
        probed = f"{link_probe['link_bps'] / 1e6:.0f} Mbit/s, latency {link_probe['latency_s'] * 1e3:.2f} ms"
        print(f"\n#### Link {name} (probed: {probed}; {time.perf_counter() - t0:.0f} s)\n")
        print("| arm | measured ms | predicted ms | measured x DDP | predicted x DDP | ratio error |")
        print("|---|---:|---:|---:|---:|---:|")
        for arm in arms:
            m, p = summary[arm]["step_s"], predicted[arm]
            assert m is not None and ddp_measured is not None
            mx, px = m / ddp_measured, p / ddp_predicted
            error = px / mx - 1
            rows.append((name, label(arm, args.density), mx, px, error))
            name_ = label(arm, args.density)
            print(f"| {name_} | {m * 1e3:.1f} | {p * 1e3:.1f} | {mx:.3f} | {px:.3f} | {error:+.1%} |")
        sys.stdout.flush()
        result[name] = {"probe": link_probe, "summary": summary, "predicted": predicted}
    within = sum(abs(r[4]) <= 0.25 for r in rows if not r[1].startswith("DDP") or "bf16" in r[1])
    total = sum(1 for r in rows if not r[1].startswith("DDP") or "bf16" in r[1])
    print(f"\nratio to DDP within 25 % of the measurement: {within} of {total} (arm, rate) pairs")
    return result


def after_decision(records: list[dict[str, Any]], arm: str, settled: bool) -> float | None:
    """Median step interval of an auto arm after its first decision, or (``settled``) after the
    decision that ended its round of trials (the setting it then keeps for ``interval`` steps); the
    interval of a decision's probe is left out. None when no run got that far."""
    after = []
    for r in records:
        history = r["auto_history"] if r["arm"] == arm else None
        if not history:
            continue
        if settled:
            ended = [d for d in history if not d.get("trial")]
            if not ended:
                continue
            history = ended[-1:]
        after += r["step_s"][int(history[0]["step"]) + 1 :]
    return statistics.median(after) if after else None


def _shown(decision: dict[str, Any]) -> str:
    return "dense" if decision["density"] is None else f"{decision['density']:g}"


def replace_steps(args: argparse.Namespace, steps: list[int]) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "steps": steps})


def same_compressor(arm: str, auto_arm: str) -> bool:
    """A fixed arm that ``auto_arm`` could have chosen (same method and compressor), or DDP."""
    return ARMS[arm][1] is None or ARMS[arm][1:] == ARMS[auto_arm][1:]


def auto(link: netns.TwoHostLink, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """density='auto' against DDP and the fixed settings of its compressor, interleaved, per rate."""
    arms = [a for a in AUTO_ARMS if a in args.auto_arms]
    print("\n### density='auto' against DDP and the fixed settings (step ms, interleaved)\n")
    print(
        f"Runs of {args.auto_steps[0]} and {args.auto_steps[1]} steps. Auto arms: median step once its "
        "round of trials ended (in brackets: from its first decision on, trials included); "
        "auto / best: the first over the best of DDP and the fixed arms of the same compressor.\n"
    )
    print("| link | " + " | ".join(label(a, args.density) for a in arms) + " | auto / best | auto chose |")
    print("|---|" + "---:|" * len(arms) + "---:|---|")
    result = {}
    for index, rate_text in enumerate(args.auto_rates):
        rate = netns.parse_rate(rate_text)
        link.shape(rate)
        records = run_steps(link, arms, replace_steps(args, args.auto_steps), tmp, f"a{index}")
        summary = link_report.summarise_steps(records)
        steps = {a: summary[a]["step_s"] for a in arms}
        cells, ratios, chose = [], [], []
        for a in arms:
            if not a.endswith("_auto"):
                cells.append("n/a" if steps[a] is None else f"{steps[a] * 1e3:.1f}")
                continue
            steady = after_decision(records, a, settled=True)
            overall = after_decision(records, a, settled=False)
            cells.append(
                "n/a" if steady is None or overall is None else f"{steady * 1e3:.1f} ({overall * 1e3:.1f})"
            )
            fixed = [steps[f] for f in arms if not f.endswith("_auto") and same_compressor(f, a) and steps[f]]
            if steady is not None and fixed:
                ratios.append(f"{steady / min(fixed):.2f}")  # type: ignore[type-var]
            histories = [r["auto_history"] for r in records if r["arm"] == a and r["auto_history"]]
            kept = {_shown(d) for h in histories for d in h[-1:] if not d.get("trial")}
            tried = {_shown(d) for h in histories for d in h if d.get("trial")}
            what = ", ".join(sorted(kept)) or "unsettled"
            chose.append(f"{label(a, args.density)}: {what} (tried {', '.join(sorted(tried)) or 'none'})")
        print(
            f"| {netns.format_rate(rate)} | {' | '.join(cells)} | {', '.join(ratios)} | {'; '.join(chose)} |"
        )
        sys.stdout.flush()
        result[netns.format_rate(rate)] = {"summary": summary, "records": records}
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", choices=["all", "validate", "auto"], default="all")
    p.add_argument("--rates", nargs="+", default=["none", "1gbit", "100mbit", "10mbit"])
    p.add_argument("--auto-rates", nargs="+", default=["100mbit", "1gbit", "none"])
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS)
    p.add_argument("--auto-arms", nargs="+", default=AUTO_ARMS)
    p.add_argument("--steps", type=int, nargs=2, default=[10, 40])
    p.add_argument(
        "--auto-steps", type=int, nargs=2, default=[10, 120], help="run lengths of the auto comparison"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 1024, 960, 10])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--min-run-time", type=float, default=0.3, help="calibration: seconds per timed pipeline")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="calibrate again before each rate (a machine whose load drifts)",
    )
    p.add_argument("--quick", action="store_true", help="rates none and 100mbit, short runs, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.auto_rates = ["none", "100mbit"], ["100mbit", "none"]
        args.steps, args.repeats, args.min_run_time = [12, 24], 1, 0.1
        args.auto_steps = [12, 60]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        link = netns.prepare_link()
    except netns.LinkSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(bench_link.header(argparse.Namespace(delay_ms=0.0, density=args.density, no_gso=False)))
    given = sys.argv[1:] if argv is None else argv
    print(f"command: python benchmarks/link/bench_plan_link.py {' '.join(given)}")
    result: dict[str, Any] = {}
    with link, tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp_name:
        tmp = Path(tmp_name)
        if args.what in ("all", "validate"):
            profile, compute_s = calibrate_hosts(link, args, tmp)
            print(f"calibrated on both hosts at once: compute {compute_s * 1e3:.1f} ms per step")
            print(f"profile: {profile.source}")
            topk, gmc = profile.compressors_ns["topk"]["0.01"], profile.methods_ns["gmc"]
            print(f"e.g. topk 1 %: {topk:.1f} ns/element, the gmc method: {gmc:.1f} ns/element")
            result["profile"], result["compute_s"] = json.loads(profile.to_json()), compute_s
            result["validate"] = validate(link, args, tmp, profile, compute_s)
        if args.what in ("all", "auto"):
            result["auto"] = auto(link, args, tmp)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
