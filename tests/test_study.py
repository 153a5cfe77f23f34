"""The non-IID study script runs end to end, and the simulator's evaluation model is the documented one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from lightning_gmc import Simulator

REPO = Path(__file__).resolve().parents[1]


def test_study_quick_mode_writes_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "noniid_study.py"),
            "--quick",
            "--workers",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    for label in ("DMSGD (dense)", "GMC", "CSER"):
        assert f"| {label} |" in table
    assert "Command: `python examples/noniid_study.py --quick" in table
    assert (out / "curves.png").stat().st_size > 0


def test_evaluation_params_follow_each_method() -> None:
    shapes = {"w": torch.zeros(6)}
    workers = [{"w": torch.arange(6.0) + k} for k in range(3)]
    gmc = Simulator(shapes, 3, method="gmc", compressor="topk", density=0.5)
    assert torch.equal(gmc.evaluation_params(workers, 0.1)["w"], workers[0]["w"])
    cser = Simulator(shapes, 3, method="cser", compressor="topk", density=0.5)
    torch.testing.assert_close(cser.evaluation_params(workers, 0.1)["w"], torch.arange(6.0) + 1)
    # DEF-A evaluates x_t - (1/K) sum_k e_k (docs/algorithms.md 2.6), residuals in parameter units
    def_a = Simulator(shapes, 3, method="def_a", compressor="topk", density=0.5)
    for k, worker in enumerate(def_a.workers):
        worker.tensors["residual"][0].fill_(float(k + 1))
    torch.testing.assert_close(def_a.evaluation_params(workers, 0.1)["w"], workers[0]["w"] - 2.0)
