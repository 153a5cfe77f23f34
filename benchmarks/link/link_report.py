"""Summaries, tables and the plot of ``bench_link.py`` (pure functions over the nodes' records).

Step records (one per host per fit, see ``link_node.py``) -> per arm and rate:

* step time: median over both hosts of the steady-state step intervals (the first interval of a fit,
  which holds DDP's bucket rebuild, is dropped);
* link bytes per step: ``(tx(N2) - tx(N1)) / (N2 - N1)`` per host and repeat, where ``tx(N)`` is what
  the host's veth end transmitted during a fit of N steps -- the difference cancels everything a fit
  sends once (DDP's parameter broadcast, Lightning's set-up collectives); mean over hosts, median over
  repeats;
* formula bytes per step: ring all-reduce ``2 (K-1)/K * 4 d`` for DDP, ``2 (K-1)/K * 2 d`` with the
  bf16 hook, and for the compressed arms the library's own ``gmc/bytes_sent`` (the wire formula of
  the route it took), taken over the same two run lengths.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

WORLD = 2

_DENSE_BYTES_PER_PARAM = {"ddp": 4.0, "ddp_bf16": 2.0}


def ring_allreduce_bytes(nbytes: float, world: int = WORLD) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: ``2 (K-1)/K * nbytes``."""
    return 2.0 * (world - 1) / world * nbytes


def _marginal(records: Sequence[dict[str, Any]], key: str) -> float | None:
    """Median over (host, repeat) pairs of ``(value(N2) - value(N1)) / (N2 - N1)``."""
    by_run: dict[tuple[int, int], dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.get(key) is not None:
            by_run[(r["rank"], r["repeat"])][r["steps"]] = float(r[key])
    per_repeat: dict[int, list[float]] = defaultdict(list)
    for (_, repeat), runs in by_run.items():
        if len(runs) == 2:
            (n1, v1), (n2, v2) = sorted(runs.items())
            per_repeat[repeat].append((v2 - v1) / (n2 - n1))
    means = [statistics.fmean(v) for v in per_repeat.values()]
    return statistics.median(means) if means else None


def summarise_steps(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per arm: ``step_s``, ``link_bytes``, ``formula_bytes``, ``params`` (see the module docstring)."""
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_arm[r["arm"]].append(r)
    out: dict[str, dict[str, float | None]] = {}
    for arm, recs in by_arm.items():
        steady = [s for r in recs for s in r["step_s"][1:]]
        params = float(recs[0]["params"])
        if arm in _DENSE_BYTES_PER_PARAM:
            formula: float | None = ring_allreduce_bytes(_DENSE_BYTES_PER_PARAM[arm] * params)
        else:
            formula = _marginal(recs, "gmc_bytes_sent_total")
        out[arm] = {
            "step_s": statistics.median(steady) if steady else None,
            "link_bytes": _marginal(recs, "tx_bytes"),
            "formula_bytes": formula,
            "params": params,
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def steps_table(summary: dict[str, dict[str, float | None]], labels: dict[str, str]) -> str:
    """Markdown table of one rate: step time, x DDP, link bytes, formula and their ratios."""
    ddp = summary.get("ddp", {})
    lines = [
        "| arm | step ms | x DDP step | link bytes/step | formula bytes/step | link / formula"
        " | link bytes x DDP |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, s in summary.items():
        step_ms = None if s["step_s"] is None else 1000 * s["step_s"]
        lines.append(
            f"| {labels.get(arm, arm)} | {_fmt(step_ms, '.1f')}"
            f" | {_fmt(_ratio(s['step_s'], ddp.get('step_s')), '.3f')}"
            f" | {_fmt(s['link_bytes'], ',.0f')} | {_fmt(s['formula_bytes'], ',.0f')}"
            f" | {_fmt(_ratio(s['link_bytes'], s['formula_bytes']), '.3f')}"
            f" | {_fmt(_ratio(s['link_bytes'], ddp.get('link_bytes')), '.4f')} |"
        )
    return "\n".join(lines)


def sweep_table(by_rate: dict[str, dict[str, dict[str, float | None]]], labels: dict[str, str]) -> str:
    """Markdown table: step time as a multiple of DDP's, one column per rate."""
    rates = list(by_rate)
    arms = [a for a in next(iter(by_rate.values()))] if by_rate else []
    lines = ["| arm | " + " | ".join(rates) + " |", "|---|" + "---:|" * len(rates)]
    for arm in arms:
        cells = []
        for rate in rates:
            s, d = by_rate[rate].get(arm, {}), by_rate[rate].get("ddp", {})
            r = _ratio(s.get("step_s"), d.get("step_s"))
            ms = s.get("step_s")
            cells.append("n/a" if r is None or ms is None else f"{r:.3f} ({1000 * ms:.0f} ms)")
        lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossover(
    by_rate: dict[str, dict[str, dict[str, float | None]]], bits_per_s: dict[str, float | None], arm: str
) -> tuple[list[str], list[str]]:
    """(rates at which ``arm``'s step is faster than DDP's, rates at which it is not), slowest first
    ("none", the unlimited veth, last)."""

    def speed(rate: str) -> float:
        bits = bits_per_s[rate]
        return float("inf") if bits is None else bits

    pays, not_pays = [], []
    for rate in sorted(by_rate, key=speed):
        r = _ratio(by_rate[rate].get(arm, {}).get("step_s"), by_rate[rate].get("ddp", {}).get("step_s"))
        if r is not None:
            (pays if r < 1.0 else not_pays).append(rate)
    return pays, not_pays


def time_to_target(points: Sequence[Sequence[float]], target: float) -> float | None:
    """Training wall time of the first evaluation at or above ``target`` accuracy (None: never)."""
    for t, acc in points:
        if acc >= target:
            return float(t)
    return None


def tta_table(runs: Sequence[dict[str, Any]], targets: Sequence[float], labels: dict[str, str]) -> str:
    """Markdown table: per (model, rate, method) time to each target (and as a multiple of DDP's on the
    same link), final accuracy, total training time."""
    head = "".join(f" time to {100 * t:g} % (x DDP) |" for t in targets)
    lines = [
        f"| model | link | method |{head} final acc | train time | steps |",
        "|---|---|---|" + "---:|" * (len(targets) + 3),
    ]
    ddp = {(r["model"], r["rate"]): r["points"] for r in runs if r["method"] == "ddp"}
    for r in runs:
        cells = []
        for target in targets:
            t = time_to_target(r["points"], target)
            ref = ddp.get((r["model"], r["rate"]))
            ratio = _ratio(t, None if ref is None else time_to_target(ref, target))
            cells.append("never" if t is None else f"{t:.1f} s ({_fmt(ratio, '.2f')})")
        lines.append(
            f"| {r['model']} ({r['params']:,} params) | {r['rate']} | {labels.get(r['method'], r['method'])}"
            f" | {' | '.join(cells)} | {100 * r['points'][-1][1]:.1f} %"
            f" | {r['points'][-1][0]:.1f} s | {r['steps']} |"
        )
    return "\n".join(lines)


def plot_tta(
    runs: Sequence[dict[str, Any]], targets: Sequence[float], path: str, labels: dict[str, str]
) -> None:
    """Accuracy vs training wall time, one panel per model, colour = method, line style = link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in runs))
    rates = list(dict.fromkeys(r["rate"] for r in runs))
    colours = {"ddp": "tab:blue", "gmc": "tab:orange", "gmc_plus": "tab:green"}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in (r for r in runs if r["model"] == model):
            ts, accs = zip(*r["points"], strict=True)
            ax.plot(
                ts,
                [100 * a for a in accs],
                marker="o",
                ms=3,
                color=colours.get(r["method"]),
                linestyle=styles[rates.index(r["rate"]) % len(styles)],
                label=f"{labels.get(r['method'], r['method'])}, {r['rate']}",
            )
        for target in targets:
            ax.axhline(100 * target, color="grey", lw=0.8)
        params = next(r["params"] for r in runs if r["model"] == model)
        ax.set(
            xscale="log",
            xlabel="training wall time (s, log scale; validation excluded)",
            ylabel="test accuracy (%)",
            title=f"digits non-IID, 2 hosts, {model} ({params:,} params)",
        )
        lowest = min(100 * a for r in runs if r["model"] == model for _, a in r["points"])
        ax.set_ylim(max(0.0, min(100 * min(targets) - 20, lowest - 5)), 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
