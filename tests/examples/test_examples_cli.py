"""LightningCLI configs, the bare strategy name, multi-process runs and the offline demo (examples/)."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from launch import launch_nodes, run_script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning_gmc  # noqa: E402
from examples.configs.generate import main as generate_main  # noqa: E402
from examples.train import cli_main  # noqa: E402

CONFIG_DIR = ROOT / "examples" / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
# The RBGS study's configs differ only in their detach coefficient: one coefficient per method and
# model runs a step (all of them are checked for content and sync).
RUN_CONFIGS = [p for p in CONFIGS if p.parent.name != "rbgs_noniid" or "coeff0.5" in p.name]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["train.py"])


def test_configs_cover_the_paper_tables() -> None:
    rel = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    # Tables 1-2: 2 datasets x 2 models x 5 methods each; Table 3: 2 methods x 5 coefficients;
    # Table 4: 2 datasets x 2 distributions x 2 models x 2 methods; digits: 7 runs x IID/non-IID;
    # the RBGS non-IID study: 2 models x (4 GMC+ + 3 DEF-A + 4 aggregate-momentum coefficients).
    dirs = ("table1", "table2", "table3", "table4", "digits", "rbgs_noniid")
    counts = {t: sum(r.startswith(t + "/") for r in rel) for t in dirs}
    assert counts == {"table1": 20, "table2": 20, "table3": 10, "table4": 16, "digits": 14, "rbgs_noniid": 22}
    for path in CONFIGS:
        cfg = yaml.safe_load(path.read_text())
        trainer = cfg["trainer"]
        assert trainer["use_distributed_sampler"] is False
        if path.parent.name == "adamw":  # AdamW runs (method="ef" and its DDP baseline)
            assert cfg["model"]["optimizer"] == "adamw" and cfg["model"]["weight_decay"] == 0.05
        else:
            assert cfg["model"]["momentum"] == 0.9 and cfg["model"]["weight_decay"] == 1e-4
        if path.parent.name.startswith("table") or path.parent.name == "rbgs_noniid":
            assert trainer["devices"] == 8 and trainer["max_epochs"] == 200
            assert cfg["data"]["init_args"]["batch_size"] * trainer["devices"] == 128
            noniid = "_noniid_" in path.name
            assert cfg["data"]["init_args"]["partition"] == ("dirichlet" if noniid else "iid")
            net = cfg["model"]["model"]
            if net["class_path"].endswith("ResNet20"):
                assert net["init_args"]["norm"] == ("gn" if noniid else "bn")


def test_generated_configs_are_in_sync() -> None:
    assert generate_main(["--check"]) == 0, "run: python examples/configs/generate.py"


def _fast_dev_args(path: Path, tmp_path: Path, cfg: dict[str, Any]) -> list[str]:
    args = [
        "fit",
        "--config",
        str(path),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.fast_dev_run=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if cfg["data"]["class_path"].endswith("CIFARDataModule"):
        # Generated data of CIFAR's shape: no download, no files.
        args += [
            "--data.init_args.synthetic=true",
            "--data.init_args.synthetic_train_size=64",
            "--data.init_args.synthetic_test_size=16",
            "--data.init_args.batch_size=4",
            "--data.init_args.eval_batch_size=8",
            "--data.init_args.num_workers=0",
        ]
    return args


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=[p.relative_to(CONFIG_DIR).as_posix() for p in RUN_CONFIGS])
def test_config_parses_and_runs_one_step(path: Path, tmp_path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    cli = cli_main(_fast_dev_args(path, tmp_path, cfg))
    assert cli.trainer.global_step == 1
    strategy = cfg["trainer"]["strategy"]
    if isinstance(strategy, dict) and strategy["class_path"] == "lightning_gmc.GMCStrategy":
        assert isinstance(cli.trainer.strategy, lightning_gmc.GMCStrategy)
        for key in ("density", "detach"):
            if key in strategy["init_args"]:
                assert (
                    cli.config["fit"]["trainer"]["strategy"]["init_args"][key] == strategy["init_args"][key]
                )
    assert "val/acc" in cli.trainer.callback_metrics


def test_config_with_a_misspelled_name_fails(tmp_path: Path) -> None:
    # A config whose method or compressor does not exist must fail the config test, not skip it.
    path = CONFIG_DIR / "digits" / "gmc_noniid.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["trainer"]["strategy"]["class_path"] == "lightning_gmc.GMCStrategy"
    for key, wrong in (("method", "gmcc"), ("compressor", "topkk")):
        bad = yaml.safe_load(path.read_text())
        bad["trainer"]["strategy"]["init_args"][key] = wrong
        bad_path = tmp_path / f"bad_{key}.yaml"
        bad_path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=f"unknown {key} '{wrong}'"):
            cli_main(_fast_dev_args(bad_path, tmp_path, bad))


@pytest.mark.parametrize("name", ["gmc", "gmc_plus"])
def test_bare_strategy_name(name: str, tmp_path: Path) -> None:
    path = CONFIG_DIR / "digits" / "gmc_noniid.yaml"
    cfg = yaml.safe_load(path.read_text())
    cli = cli_main([*_fast_dev_args(path, tmp_path, cfg), f"--trainer.strategy={name}"])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, lightning_gmc.GMCStrategy)
    assert cli.trainer.global_step == 1


def test_single_strategy_fields_override_from_the_command_line() -> None:
    # The README's overrides: one field of the config's strategy, the rest kept...
    path = str(CONFIG_DIR / "digits" / "gmc_noniid.yaml")
    for flag in ("--trainer.strategy.init_args.density=0.05", "--trainer.strategy.density=0.05"):
        cli = cli_main(
            ["--config", path, flag, "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False
        )
        config = cli.trainer.strategy.gmc_config
        assert (config.density, config.compressor) == (0.05, "topk_approx"), flag
    # ...and the class plus one field on a config whose strategy is plain DDP
    path = str(CONFIG_DIR / "digits" / "ddp_noniid.yaml")
    args = ["--trainer.strategy=lightning_gmc.GMCStrategy", "--trainer.strategy.density=0.05"]
    cli = cli_main(["--config", path, *args, "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    assert cli.trainer.strategy.gmc_config.density == 0.05


def test_digits_config_on_two_processes(tmp_path: Path) -> None:
    """The real path: LightningCLI launching 2 gloo ranks, GMC metrics in the CSV log."""
    cmd = [
        ROOT / "examples" / "train.py",
        "fit",
        "--config",
        str(CONFIG_DIR / "digits" / "gmc_noniid.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=8",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    proc = run_script(cmd, cwd=tmp_path, timeout=240)  # Lightning starts the second rank
    assert "class histogram per rank" in proc.output
    csvs = list(tmp_path.rglob("metrics.csv"))
    assert len(csvs) == 1
    header = csvs[0].read_text().splitlines()[0].split(",")
    for key in ("gmc/bytes_sent", "gmc/rcc", "gmc/density", "train/loss", "val/acc"):
        assert key in header


_NODE_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    sys.path.insert(0, {root!r})
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning_gmc import GMCStrategy
    from examples.data import DigitsDataModule
    from examples.models import ClassificationModule, DigitsCNN

    seed_everything(0)
    dm = DigitsDataModule(partition="dirichlet", alpha=0.1, batch_size=16)
    module = ClassificationModule(DigitsCNN(), lr=0.1, max_epochs=1)
    trainer = Trainer(accelerator="cpu", devices=1, num_nodes=2, max_epochs=1, limit_train_batches=6,
                      limit_val_batches=0, strategy=GMCStrategy(density=0.05), use_distributed_sampler=False,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    shard = dm.train_shard.indices[:5]
    print("RESULT", trainer.global_rank, trainer.world_size, trainer.global_step,
          hashlib.sha256(flat.numpy().tobytes()).hexdigest(), list(shard))
    """
)


def test_two_nodes_from_environment_train_in_sync(tmp_path: Path) -> None:
    """num_nodes=2, devices=1 started as two processes the way a cluster does: node rank and the
    rendezvous address come from the environment (loopback), Lightning launches nothing itself."""
    script = tmp_path / "node.py"
    script.write_text(_NODE_SCRIPT.format(root=str(ROOT)))
    # LOCAL_RANK=0: each node's one rank exists already, Lightning starts none
    nodes = launch_nodes([script], 2, cwd=tmp_path, env={"LOCAL_RANK": "0"}, timeout=240)
    outs = []
    for node in nodes:
        out = node.stdout
        outs.append(next(line for line in out.splitlines() if line.startswith("RESULT")).split(maxsplit=5))
    ranks = sorted(int(o[1]) for o in outs)
    assert ranks == [0, 1]
    assert all(o[2] == "2" and o[3] == "6" for o in outs)
    # Same parameters bit for bit on both nodes after 6 compressed steps ...
    assert outs[0][4] == outs[1][4]
    # ... while each node trained on its own shard.
    assert outs[0][5] != outs[1][5]


def test_demo_quick(tmp_path: Path) -> None:
    out_json = tmp_path / "demo.json"
    cmd = [
        ROOT / "examples" / "demo.py",
        "--quick",
        "--no-progress",
        "--json",
        str(out_json),
    ]
    proc = run_script(cmd, cwd=tmp_path, timeout=300)  # two runs of 2 ranks each
    assert "| run | test acc | bytes sent / rank | RCC | wall time |" in proc.stdout
    results = {r["run"]: r for r in json.loads(out_json.read_text())}
    assert set(results) == {"gmc", "ddp"}
    gmc, ddp = results["gmc"], results["ddp"]
    assert gmc["steps"] == ddp["steps"] == 5
    # GMC's bytes are what the strategy counted; the DDP row is the demo's own formula, so only GMC's
    # count is checked, against the wire formula: per step, one all-gather of k (fp32 value, int32
    # index) pairs per parameter (top-k at the demo's 1 %), which each of the 2 ranks sends once.
    from examples.models import DigitsCNN

    numels = [p.numel() for p in DigitsCNN().parameters()]
    assert gmc["params"] == ddp["params"] == sum(numels)
    per_step = 8 * sum(max(1, math.floor(0.01 * n + 1e-9)) for n in numels)
    assert gmc["bytes_sent"] == 5 * per_step
    assert 0 < gmc["rcc"] < 0.1
    for r in (gmc, ddp):
        assert 0.0 <= r["test_acc"] <= 1.0 and r["wall_s"] > 0
