"""``hierarchy="node"``: bytes inside and between nodes, method state per rank, and step time.

Two "nodes" of two ranks each (plain DDP + ``gmc_hook``, gloo), the MLP 64-1024-960-10 (1,060,170
parameters, batch 32 per rank), GMC with exact top-k at 1 % (and GMC+ with RBGS 1 %, detach 0.5, for the
bytes). Arms:

* ``node2x2``: ``hierarchy="node"``, 2 nodes x 2 ranks (K = 2 logical workers), the sharded 2-D reducer;
* ``flat4``: ``hierarchy="flat"`` over all 4 ranks (K = 4);
* ``flat2``: one rank per node, flat (K = 2): what the inter-node link must carry under the hierarchy;
* ``ddp``: plain DDP over the 4 ranks (no hook; step time only).

``bytes`` (default; loopback, no root): per arm, from the library's metrics, the bytes per rank per
step inside the node (``gmc/bytes_sent_intra``) against the 2-D floor ``2 (G-1)/G * 4n`` and against
the prototype's ``2 (G-1)/G * 4n * (2 + B)`` (a dense all-reduce of the gradient, then a share-back
all-reduce of the direction and of the method's B buffers; quoted, the prototype is gone); the bytes
leaving a node per step (summed ``gmc/bytes_sent_inter`` of its ranks) against ``flat2``; and the
method-state bytes per rank (``GMCHookState.method_state_bytes``) against a flat run's. Then, from
the in-process :class:`~lightning_gmc.HierarchicalSimulator` (the same shard plan and accounting),
the same ratios for G = 2, 4 and 8.

``steps`` (Linux, root; ``benchmarks/link/netns.py``): the ranks of node ``n`` run inside network
namespace ``n``, the two joined by a veth pair limited to each ``--rates`` entry (both directions).
Per rate, ``ddp``, ``flat4`` and ``node2x2`` run in ``--rounds`` interleaved rounds (the order rotates
every round); each rank times ``--steps`` steps after ``--warmup``; the table gives the median over
rounds of rank 0's step time and its ratio to DDP's in the same rate. Also prints the veth bytes per
step of node 0's end (marginal over two run lengths is not needed: the counters are read around the
timed steps only).

Run (from the repository root)::

    python benchmarks/bench_hierarchy.py                                  # bytes and state
    python benchmarks/bench_hierarchy.py steps --rates 100mbit 1gbit       # step time (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent / "link"))  # netns.py

ARMS = {"node2x2": ("node", 2, 2), "flat4": ("flat", 2, 2), "flat2": ("flat", 2, 1), "ddp": ("ddp", 2, 2)}
CASES = {
    "gmc topk 1%": {"compressor": "topk", "density": 0.01},
    "gmc+ rbgs 1%": {"compressor": "rbgs", "density": 0.01, "detach": 0.5},
}
DIMS = [64, 1024, 960, 10]
_LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")


def build_model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(len(DIMS) - 1):
        layers += [nn.Linear(DIMS[i], DIMS[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def worker(cfg: dict[str, Any]) -> None:
    """One rank: every case (bytes) or the timed case (steps); writes its measurements as JSON."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from lightning_gmc import GMCConfig, GMCHookState, gmc_hook
    from lightning_gmc.hook import build_node_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    interface = cfg.get("interface")

    def tx() -> int:
        dist.barrier()  # the peer has received everything sent before
        return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text()) if interface else 0

    out: dict[str, Any] = {}
    for name in cfg["cases"]:
        model = build_model()
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        state = None
        if cfg["mode"] != "ddp":
            state = GMCHookState.from_config(GMCConfig(hierarchy=cfg["mode"], **CASES[name]))
            if cfg["mode"] == "node":
                state.set_node_groups(build_node_groups(cfg["ranks_per_node"]))
            state.attach(model, optimizer)
            ddp.register_comm_hook(state, gmc_hook)
        gen = torch.Generator().manual_seed(1000 + rank)
        metrics: dict[str, float] = {}
        timed = cfg["warmup"] + cfg["steps"]
        before = start = 0.0
        for step in range(timed):
            if step == cfg["warmup"]:
                before = tx()
                start = time.perf_counter()
            x = torch.randn(32, DIMS[0], generator=gen)
            y = torch.randint(0, DIMS[-1], (32,), generator=gen)
            if state is not None:
                with state.detached_point():
                    nn.functional.cross_entropy(ddp(x), y).backward()
            else:
                nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if state is not None:
                metrics = state.take_metrics()
        seconds = time.perf_counter() - start
        after = tx()
        out[name] = {
            "step_s": seconds / cfg["steps"],
            "tx_per_step": (after - before) / cfg["steps"],
            "metrics": metrics,
            "state_bytes": state.method_state_bytes if state is not None else 0,
        }
    Path(cfg["out_dir"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(arm: str, cases: list[str], warmup: int, steps: int, link: Any | None) -> list[dict[str, Any]]:
    """Run one arm; return every rank's measurements (rank order)."""
    mode, nodes, per_node = ARMS[arm]
    world = nodes * per_node
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"mode": mode, "ranks_per_node": per_node, "cases": cases, "warmup": warmup, "steps": steps}
        cfg["out_dir"] = tmp
        if link is not None:
            cfg["interface"] = "gmc0"
        cfg_path = Path(tmp, "cfg.json")
        cfg_path.write_text(json.dumps(cfg))
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
        env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
        env["MASTER_ADDR"] = link.addresses[0] if link is not None else "127.0.0.1"
        if link is not None:
            env["GLOO_SOCKET_IFNAME"] = "gmc0"
        procs = []
        for rank in range(world):
            argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg_path)]
            if link is not None:
                argv = link.exec_argv(rank // per_node, argv)
            rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(world)}
            procs.append(subprocess.Popen(argv, env=rank_env, stderr=subprocess.PIPE, text=True))
        for rank, proc in enumerate(procs):
            _, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"{arm} rank {rank} failed:\n{err[-3000:]}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def bytes_report(warmup: int, steps: int) -> None:
    from lightning_gmc import HierarchicalSimulator, Simulator

    numel = sum(p.numel() for p in build_model().parameters())
    measured = {arm: launch(arm, list(CASES), warmup, steps, None) for arm in ("node2x2", "flat4", "flat2")}
    print(f"MLP {'-'.join(map(str, DIMS))}: n = {numel:,} parameters; 2 nodes x 2 ranks, gloo on loopback.\n")
    print(
        "| case | arm | intra B/rank/step | x 2-D floor | prototype (formula) | inter B/node/step | x flat2 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    from lightning_gmc.methods import ParameterTable
    from lightning_gmc.methods.shards import plan_shards

    model = build_model()
    table = ParameterTable(
        tuple(n for n, _ in model.named_parameters()), tuple(p.shape for p in model.parameters()), (0,) * 6
    )
    plan = plan_shards(table, 2)
    residual_gather = (2 - 1) * 4 * max(plan.local_numel(r) for r in range(2))
    for name in CASES:
        buffers = 2  # GMC and GMC+ keep a residual and a momentum
        floor = 2 * (2 - 1) / 2 * 4 * numel
        prototype = floor * (2 + buffers)
        node = measured["node2x2"]
        flat2 = measured["flat2"][0][name]["metrics"]["bytes_sent"]
        intra = node[0][name]["metrics"]["bytes_sent_intra"]
        ratio = f"{intra / floor:.3f}"
        if "detach" in CASES[name]:  # the detached point's all-gather of the residual, once per step
            ratio += f" ({(intra - residual_gather) / floor:.3f} + {residual_gather / floor:.3f} residual)"
        inter = sum(r[name]["metrics"]["bytes_sent_inter"] for r in node[:2])
        print(
            f"| {name} | node2x2 | {intra:,.0f} | {ratio} | {prototype:,.0f} ({prototype / floor:.2f}x) "
            f"| {inter:,.0f} | {inter / flat2:.3f} |"
        )
        flat4 = measured["flat4"][0][name]["metrics"]["bytes_sent"]
        print(f"| {name} | flat4 | - | - | - | {flat4:,.0f} | {flat4 / flat2:.3f} |")
    flat_state = measured["flat4"][0]["gmc topk 1%"]["state_bytes"]
    node_states = [r["gmc topk 1%"]["state_bytes"] for r in measured["node2x2"]]
    print(f"\nMethod state per rank (GMC, two fp32 buffers): flat {flat_state:,} B; node2x2 {node_states} B")
    print(f"(largest x flat: {max(node_states) / flat_state:.4f}; 1/G = 0.5000)\n")
    print("From the simulator (same plan and accounting), GMC top-k 1 %, one 25 MiB bucket, 2 nodes:\n")
    print("| G | intra B/rank/step | x 2-D floor | prototype x floor | max state/rank x flat | 1/G |")
    print("|---:|---:|---:|---:|---:|---:|")
    shapes = {name: p.shape for name, p in build_model().named_parameters()}
    flat = Simulator(shapes, num_workers=2, compressor="topk")
    flat_bytes = flat.workers[0].nbytes
    for per_node in (2, 4, 8):
        sim = HierarchicalSimulator(shapes, nodes=2, ranks_per_node=per_node, compressor="topk")
        import torch

        grads = [{k: torch.randn(v) for k, v in shapes.items()} for _ in range(2 * per_node)]
        w = {k: torch.zeros(v) for k, v in shapes.items()}
        sim.step(grads, sim.gradient_points(w, 0.1), 0.1)
        intra = sim.take_intra_bytes()
        floor = 2 * (per_node - 1) / per_node * 4 * numel
        state = max(8 * sim.plan.local_numel(r) for r in range(per_node))
        print(
            f"| {per_node} | {intra:,.0f} | {intra / floor:.4f} | {2 + 2:.2f} | {state / flat_bytes:.4f} "
            f"| {1 / per_node:.4f} |"
        )


def steps_report(rates: list[str], rounds: int, warmup: int, steps: int) -> None:
    import netns

    link = netns.prepare_link()
    link.setup()
    arms = ["ddp", "flat4", "node2x2"]
    case = "gmc topk 1%"
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for rate in rates:
            link.shape(netns.parse_rate(rate))
            results[rate] = {arm: [] for arm in arms}
            for round_ in range(rounds):
                order = arms[round_ % len(arms) :] + arms[: round_ % len(arms)]
                for arm in order:
                    t0 = time.perf_counter()
                    results[rate][arm].append(launch(arm, [case], warmup, steps, link)[0][case])
                    print(f"{rate} round {round_} {arm}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        link.teardown()
    print(
        f"MLP {'-'.join(map(str, DIMS))}, 2 namespaces x 2 ranks, GMC top-k 1 %; {rounds} interleaved rounds"
    )
    print(f"of {steps} timed steps after {warmup}; median of rank 0's step time per arm.\n")
    print("| link | arm | step ms | x DDP | veth B/step (node 0 out) |")
    print("|---|---|---:|---:|---:|")
    for rate, by_arm in results.items():
        ddp = statistics.median(r["step_s"] for r in by_arm["ddp"])
        for arm in arms:
            step = statistics.median(r["step_s"] for r in by_arm[arm])
            wire = statistics.median(r["tx_per_step"] for r in by_arm[arm])
            print(f"| {rate} | {arm} | {1e3 * step:.1f} | {step / ddp:.2f} | {wire:,.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=["bytes", "steps"], default="bytes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per rate (steps)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (DDP rebuilds its buckets)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    if args.what == "bytes":
        bytes_report(args.warmup, min(args.steps, 3))
    else:
        steps_report(args.rates, args.rounds, args.warmup, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
