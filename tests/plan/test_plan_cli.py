"""The planner's command line and its inputs: models from a count, sizes, a preset, an import path or a
checkpoint; the calibration and the byte counting GPU profiles are derived from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_gmc import cli
from lightning_gmc.plan import cli as plan_cli
from lightning_gmc.plan.bytecount import SECTOR_BYTES, TOPK_PASSES, count_bytes
from lightning_gmc.plan.calibrate import calibrate, derive_gpu_profile
from lightning_gmc.plan.models import PRESETS, ModelShape, from_checkpoint, from_import_path, parse_sizes


def test_the_table_for_two_hosts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_json = tmp_path / "plan.json"
    argv = ["--params", "1.06e6", "--nodes", "2", "--inter-bw", "100mbit", "--compute-ms", "25"]
    assert plan_cli.main([*argv, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "2 nodes x 1 ranks; between nodes 100 Mbit/s" in out and "compute: 25.0 ms per step (given)" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows[0].startswith("| * |") and any("| DDP |" in row for row in rows)
    records = json.loads(out_json.read_text())
    assert [r["step_s"] for r in records] == sorted(r["step_s"] for r in records)
    ddp = next(r for r in records if r["method"] == "ddp")
    assert ddp["bytes_sent"] == 2 * 1 / 2 * 4 * 1_060_000  # ring all-reduce of the fp32 gradient, K = 2


def test_the_lightning_gmc_command_runs_the_planner(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--tensor-sizes", "256x256", "256", "--compute-ms", "5", "--top", "3"]) == 0
    assert "| DDP |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compute-ms", "5"], "give the model"),
        (["--params", "1e6"], "give --compute-ms"),
        (["--params", "1e6", "--compute-ms", "5", "--profile", "tpu"], "no device profile 'tpu'"),
        (["--model", "not_a_path", "--compute-ms", "5"], "give a preset"),
    ],
)
def test_bad_input_names_the_fix(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_rates() -> None:
    assert plan_cli.parse_rate("100mbit") == 1e8
    assert plan_cli.parse_rate("3.6tbit") == pytest.approx(3.6e12)
    assert plan_cli.parse_rate("25g") == 25e9 and plan_cli.parse_rate("1e9") == 1e9
    assert plan_cli.format_rate(2.5e9) == "2.5 Gbit/s"
    assert plan_cli.format_rate(float("inf")) == "any rate" and plan_cli.format_rate(0.0) == "never"


def test_model_inputs(tmp_path: Path) -> None:
    assert ModelShape.from_count(10_000_000).numels == (1 << 22, 1 << 22, 10_000_000 - (2 << 22))
    assert parse_sizes(["4096x1024", "1024", "1e3"]).numels == (4_194_304, 1024, 1000)
    shape, module = from_import_path("helpers:make_model", {"name": "two_buckets"})
    assert (
        shape.numels == tuple(p.numel() for p in module.parameters())
        and shape.numel == 24 * 512 + 512 + 512 * 512 + 512 + 512 * 6 + 6
    )
    assert next(module.parameters()).device.type == "meta"  # built without memory
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    torch.save({"state_dict": net.state_dict(), "epoch": 1}, tmp_path / "last.ckpt")
    # weights and biases of both layers; BatchNorm's running statistics and its counter are not trained
    assert from_checkpoint(tmp_path / "last.ckpt").numels == (12, 3, 3, 3)


def test_presets_have_the_published_parameter_counts() -> None:
    # GPT-3 Small: vocab 50257 x 768 + positions 2048 x 768 + 12 layers x (12 d^2 + 13 d) + final norm 2 d
    d = 768
    assert (
        sum(PRESETS["gpt-125m"][1]())
        == 50257 * d + 2048 * d + 12 * (12 * d * d + 13 * d) + 2 * d
        == 125_226_240
    )
    assert sum(PRESETS["llama-7b"][1]()) == 6_738_415_616  # LLaMA-7B's published count
    assert 1.3e9 < sum(PRESETS["gpt-1.3b"][1]()) < 1.33e9


def test_measure_runs_the_model_here(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "helpers:make_model", "--measure", "--input-shape", "8", "24", "--top", "1"]
    assert plan_cli.main(argv) == 0
    assert "measured here" in capsys.readouterr().out


def test_byte_counting_by_hand() -> None:
    n, k = 1000, 10
    x, y, z = torch.randn(n), torch.randn(n), torch.empty(n)
    assert count_bytes(lambda: x.mul_(2.0)) == 8 * n  # read and write
    assert count_bytes(lambda: z.copy_(x)) == 8 * n  # read x, write z
    assert count_bytes(lambda: torch.add(x, y, out=z)) == 12 * n  # read two, write one
    assert count_bytes(lambda: x.view(10, 100)) == 0  # a view moves nothing
    assert count_bytes(lambda: z.zero_()) == 4 * n  # a fill writes once
    index = torch.arange(k)
    assert count_bytes(lambda: x.index_fill_(0, index, 0.0)) == 2 * SECTOR_BYTES * k + 8 * k
    assert count_bytes(lambda: torch.topk(x, k)) == TOPK_PASSES * 4 * n + 4 * k + 8 * k


def test_calibration_and_the_gpu_derivation() -> None:
    profile = calibrate(
        numels=(4096, 64),
        min_run_time=0.01,
        compressors=("topk", "none"),
        densities=(0.01, 0.1),
        methods={"gmc": {"method": "gmc"}},
        latency=False,
    )
    assert profile.measured and profile.device == "cpu" and "thread" in profile.source
    assert set(profile.compressors_ns["topk"]) == {"0.01", "0.1"} and set(profile.compressors_ns["none"]) == {
        "1"
    }
    assert profile.methods_ns["gmc"] > 0 and profile.decode_ns_per_nnz["topk"] > 0
    # a bucket's fixed cost: the hook's work on a tiny bucket, some microseconds on any CPU
    assert 1e-6 < profile.bucket_overhead_s < 1e-2
    assert profile.compressor_overhead_s["none"] == 0.0 and profile.compressor_overhead_s["topk"] >= 0.0
    gpu = derive_gpu_profile(profile, "test-gpu", memory_bytes_per_s=2e12, efficiency=0.5)
    # ns per element = bytes per element / (0.5 * 2e12 B/s) = bytes / 1000 ns
    assert gpu.pass_ns == pytest.approx(8 / 1000)
    assert gpu.methods_ns["gmc"] == pytest.approx(profile.bytes_per_element["method:gmc"] / 1000)
    assert gpu.compressors_ns["topk"]["0.01"] == pytest.approx(
        profile.bytes_per_element["compressor:topk:0.01"] / 1000
    )
    assert not gpu.measured and gpu.source.startswith("NOT MEASURED")
    assert gpu.bucket_overhead_s == profile.bucket_overhead_s  # host-side Python, carried over


def test_the_planner_imports_only_the_layers_below_the_hook() -> None:
    # the hook's density="auto" imports the planner: the planner must not import the hook or above
    import ast

    package = Path(__file__).resolve().parents[2] / "lightning_gmc" / "plan"
    above = ("lightning_gmc.hook", "lightning_gmc.strategy", "lightning_gmc.fabric", "lightning_gmc._adapter")
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(above), f"{source.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith(above) for alias in node.names), source.name
