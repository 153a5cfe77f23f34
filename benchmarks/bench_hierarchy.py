"""Bytes on the inter-node link per step: flat K=4 vs ``hierarchy="node"`` 2x2 vs flat K=2.

Two "nodes" of two ranks each (plain DDP + ``gmc_hook``, gloo), the MLP 64-1024-960-10 (1,060,170
parameters, batch 32 per rank), GMC with exact top-k 1 % and GMC+ with RBGS 1 % (detach 0.5). Arms:

* ``flat4``: ``hierarchy="flat"`` over all 4 ranks (K = 4);
* ``node2x2``: ``hierarchy="node"``, 2 nodes x 2 ranks (K = 2 logical workers);
* ``flat2``: one rank per node, flat (K = 2): the reference the hierarchy must match.

Per arm it prints the bytes per step that leave one node for the other and their ratio to ``flat2``:

* from the library's byte metrics (loopback, always): ``flat2``: a rank's ``bytes_sent``;
  ``node2x2``: the sum of ``bytes_sent_inter`` over the node's ranks; ``flat4``: under the ring model
  of the metrics each rank sends its bytes to the next rank, and one rank per node has its successor
  on the other node, so one rank's ``bytes_sent``;
* with ``--netns`` (Linux, root; ``benchmarks/link/netns.py``): the kernel's transmit counter of node 0's
  end of a veth pair between two network namespaces, ranks of node ``n`` inside namespace ``n``,
  marginal over two run lengths (so the rendezvous and the first step's bucket rebuild cancel).

Run (from the repository root)::

    python benchmarks/bench_hierarchy.py            # library metrics on loopback
    python benchmarks/bench_hierarchy.py --netns    # plus veth bytes (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent / "link"))  # netns.py

ARMS = {"flat4": ("flat", 2, 2), "node2x2": ("node", 2, 2), "flat2": ("flat", 2, 1)}  # mode, nodes, per node
CASES = {
    "gmc topk 1%": {"compressor": "topk", "density": 0.01},
    "gmc+ rbgs 1%": {"compressor": "rbgs", "density": 0.01, "detach": 0.5},
}
_LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")


def worker(cfg: dict[str, Any]) -> None:
    """One rank: every case for every run length; writes its measurements as JSON."""
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
    for name, case in CASES.items():
        for steps in cfg["steps"]:
            torch.manual_seed(0)
            dims = [64, 1024, 960, 10]
            layers: list[nn.Module] = []
            for i in range(len(dims) - 1):
                layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
            model = nn.Sequential(*layers[:-1])
            ddp = DistributedDataParallel(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            state = GMCHookState.from_config(GMCConfig(hierarchy=cfg["mode"], **case))
            if cfg["mode"] == "node":
                state.set_node_groups(build_node_groups(cfg["ranks_per_node"]))
            state.attach(model, optimizer)
            ddp.register_comm_hook(state, gmc_hook)
            gen = torch.Generator().manual_seed(1000 + rank)
            before = tx()
            metrics: dict[str, float] = {}
            for _ in range(steps):
                x = torch.randn(32, dims[0], generator=gen)
                y = torch.randint(0, dims[-1], (32,), generator=gen)
                with state.detached_point():
                    nn.functional.cross_entropy(ddp(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                metrics = state.take_metrics()
            after = tx()
            out[f"{name}|{steps}"] = {"tx": after - before, "metrics": metrics}
    Path(cfg["out_dir"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(arm: str, steps: list[int], link: Any | None) -> list[dict[str, Any]]:
    """Run one arm; return every rank's measurements (rank order)."""
    mode, nodes, per_node = ARMS[arm]
    world = nodes * per_node
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"mode": mode, "ranks_per_node": per_node, "steps": steps, "out_dir": tmp}
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
            _, err = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"{arm} rank {rank} failed:\n{err[-3000:]}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def inter_node_bytes(arm: str, results: list[dict[str, Any]], key: str) -> float:
    """Library-metric bytes per step leaving node 0 (see the module docstring)."""
    mode, _, per_node = ARMS[arm]
    node0 = [r[key]["metrics"] for r in results[:per_node]]
    if mode == "node":
        return sum(m["bytes_sent_inter"] for m in node0)
    return float(node0[0]["bytes_sent"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--netns", action="store_true", help="also count veth bytes (root)")
    parser.add_argument("--steps", type=int, nargs=2, default=[2, 5], help="two run lengths")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    link = None
    if args.netns:
        import netns

        netns.check_prerequisites()
        netns.remove_stale()
        link = netns.TwoHostLink()
        link.setup()
        netns.install_exit_cleanup(link)
    try:
        short, long = args.steps
        measured = {arm: launch(arm, [short, long], link) for arm in ARMS}
    finally:
        if link is not None:
            link.teardown()
    print("| case | arm | K | inter-node bytes/step (metrics) | x flat2 | veth bytes/step | x flat2 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in CASES:
        key = f"{name}|{long}"
        library = {arm: inter_node_bytes(arm, results, key) for arm, results in measured.items()}
        veth = {
            arm: (results[0][key]["tx"] - results[0][f"{name}|{short}"]["tx"]) / (long - short)
            for arm, results in measured.items()
        }
        for arm in ARMS:
            mode, nodes, per_node = ARMS[arm]
            k = nodes * per_node if mode == "flat" else nodes
            lib = f"{library[arm]:,.0f} | {library[arm] / library['flat2']:.2f}"
            wire = f"{veth[arm]:,.0f} | {veth[arm] / veth['flat2']:.2f}" if link is not None else "n/a | n/a"
            print(f"| {name} | {arm} | {k} | {lib} | {wire} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
