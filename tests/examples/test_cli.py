"""The ``lightning-gmc`` command line (lightning_gmc/cli.py) and what a CLI fit prints: help that says
where the examples live, a clear failure without a clone, the optional ``plan`` command, bundled
configs by name, the test accuracy after fit, and a cosine period that follows the Trainer's epochs."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from launch import run_script

from lightning_gmc import cli

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from examples.train import cli_main  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["lightning-gmc"])


def test_help_lists_the_commands_and_says_the_examples_are_not_in_the_package(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "fit", "plan"):
        assert f"\n  {name} " in out, out
    assert "not in the installed package" in out and "--repo" in out


def test_plan_says_it_is_not_available_until_its_module_exists(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if cli.COMMANDS["plan"].resolve() is None:
        assert cli.main(["plan"]) == 2
        err = capsys.readouterr().err
        assert "`plan` is not available in this version" in err and "demo, fit" in err
    # The table's row is all it takes: a module lightning_gmc.plan with main(argv) -> int is run.
    seen: list[list[str]] = []
    fake = types.ModuleType("lightning_gmc.plan")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning_gmc.plan", fake)
    assert cli.main(["plan", "--model", "x"]) == 0
    assert seen == [["--model", "x"]]


def test_a_broken_command_module_shows_its_own_import_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "not available" is only for a module that does not exist, not for one whose own imports fail.
    (tmp_path / "cli_command_with_missing_dependency.py").write_text(
        "import no_such_dependency_of_the_command\n\ndef main(argv):\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = cli.Command("broken", target="cli_command_with_missing_dependency:main")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_of_the_command"):
        broken.resolve()
    assert cli.Command("absent", target="no_such_command_module:main").resolve() is None
    with pytest.raises(AttributeError):
        cli.Command("inner", target="lightning_gmc.cli:no_such_function").resolve()


@pytest.mark.parametrize("command", [["demo"], ["fit", "digits/gmc_noniid"], ["fit", "--list"]])
def test_demo_and_fit_without_a_clone_say_where_to_get_the_examples(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As from a wheel: the package's folder and the working directory hold no examples/.
    monkeypatch.setattr(cli, "_package_parent", lambda: tmp_path / "site-packages")
    monkeypatch.delenv("LIGHTNING_GMC_REPO", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "live in the lightning-gmc repository, not in the installed package" in err
    assert "git clone" in err and "--repo PATH" in err and "[examples]" in err


def test_a_path_that_is_not_a_clone_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--repo", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a clone of lightning-gmc" in capsys.readouterr().err


def test_find_repository_prefers_the_clone_the_package_comes_from(tmp_path: Path) -> None:
    assert cli.find_repository(cwd=tmp_path) == REPO  # this checkout (tests import it from here)
    assert cli.find_repository(REPO) == REPO


def test_fit_lists_and_resolves_bundled_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fit", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    on_disk = sorted(
        p.relative_to(REPO / "examples" / "configs").with_suffix("").as_posix()
        for p in (REPO / "examples" / "configs").rglob("*.yaml")
    )
    assert listed == on_disk and "digits/gmc_noniid" in listed
    assert cli.main(["fit", "digits/no_such_config"]) == 2
    assert "no config 'digits/no_such_config'" in capsys.readouterr().err
    assert cli.main(["fit"]) == 2  # no config: the usage and the list, on stderr
    assert "digits/gmc_noniid" in capsys.readouterr().err


def _short_fit_args(tmp_path: Path) -> list[str]:
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=3",
        "--trainer.max_steps=3",  # (limit_train_batches=1 would parse as 1.0, i.e. every batch)
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]


def test_the_cosine_period_follows_the_trainer_unless_set(tmp_path: Path) -> None:
    config = str(REPO / "examples" / "configs" / "digits" / "gmc_noniid.yaml")
    cli_run = cli_main(["fit", "--config", config, *_short_fit_args(tmp_path)])
    (scheduler_config,) = cli_run.trainer.lr_scheduler_configs
    assert scheduler_config.scheduler.T_max == 3  # the overridden trainer.max_epochs, not the config's 20
    with pytest.warns(UserWarning, match="cosine period max_epochs=20 of the model differs .* max_epochs=3"):
        cli_main(["fit", "--config", config, "--model.max_epochs=20", *_short_fit_args(tmp_path)])


def test_a_cli_fit_prints_the_test_accuracy(tmp_path: Path) -> None:
    # The console script's path: `lightning-gmc fit NAME overrides` runs examples/train.py of the clone.
    command = [
        "-m",
        "lightning_gmc.cli",
        "fit",
        "digits/gmc_noniid",
        *_short_fit_args(tmp_path),
    ]
    proc = run_script(command, cwd=tmp_path, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("final test accuracy: ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    accuracy = float(lines[0].split()[3].rstrip("%"))
    assert 0.0 <= accuracy <= 100.0
    assert lines[0].endswith("(after 3 training steps)"), lines[0]
