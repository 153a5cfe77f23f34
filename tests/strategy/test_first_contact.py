"""A new user's first mistakes fail early and clearly: a misspelt strategy argument in the constructor,
an optimizer or setting the method cannot use before any process starts; and what both strategies
share (registered names) is one table. Also the progress bar's byte count with a unit (one process)."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from launch import run_script
from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_REGISTRY
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.launchers import multiprocessing as mp_launcher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from lightning_gmc import METHODS, GMCFabricStrategy, GMCStrategy
from lightning_gmc._adapter import format_bytes

STRATEGIES = [GMCStrategy, GMCFabricStrategy]


# ------------------------------------------------------------------------ unknown keyword arguments
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("densty", "density"),
        ("compresor", "compressor"),
        ("bucket_cap", "bucket_cap_mb"),
        ("detatch", "detach"),
    ],
)
def test_misspelt_argument_fails_in_the_constructor_with_the_closest_name(
    strategy: type, typo: str, meant: str
) -> None:
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{typo}'\. Did you mean '{meant}'\?"):
        strategy(**{typo: 0.1})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_keyword_far_from_every_name_lists_the_valid_ones(strategy: type) -> None:
    with pytest.raises(TypeError) as info:
        strategy(xyzzy=1)
    message = str(info.value)
    assert "Did you mean" not in message
    assert "density" in message and "bucket_cap_mb" in message and "find_unused_parameters" in message


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_distributed_data_parallel_argument_still_passes(strategy: type) -> None:
    # The valid names are read here from torch's own signature, independently of the library.
    signature = inspect.signature(DistributedDataParallel.__init__)
    names = [
        n for n, p in signature.parameters.items() if n not in ("self", "module") and p.kind != p.VAR_KEYWORD
    ]
    assert {"bucket_cap_mb", "find_unused_parameters", "static_graph", "gradient_as_bucket_view"} <= set(
        names
    )
    # None is what LightningCLI passes for unset arguments; `mixed_precision` is refused only when set.
    built = strategy(**{name: None for name in names})
    kept = built._ddp_kwargs
    assert set(kept) == set(names) - {"mixed_precision"}
    real = strategy(bucket_cap_mb=1, find_unused_parameters=True, gradient_as_bucket_view=True)
    assert real._ddp_kwargs == {
        "bucket_cap_mb": 1,
        "find_unused_parameters": True,
        "gradient_as_bucket_view": True,
    }


# ------------------------------------------------------------------------------ before launch
class _Module(L.LightningModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.optimizer = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=1e-3)
        if self.optimizer == "nesterov":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
        if self.optimizer == "two":
            return [torch.optim.SGD(params, lr=0.1), torch.optim.SGD(self.net.parameters(), lr=0.1)]
        if self.optimizer == "reads_trainer":
            return torch.optim.Adam(params, lr=1e-3 * self.trainer.max_epochs)
        if self.optimizer == "partial":
            return torch.optim.SGD([self.net.weight], lr=0.1)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class _Manual(_Module):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _ProcessesStarted(Exception):
    """Raised where the launcher would start the other ranks."""


@pytest.fixture
def no_rank_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # If a check did not run before launch, the launcher would start processes: make that an error
    # (and never start copies of pytest).
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise _ProcessesStarted

    monkeypatch.setattr(_SubprocessScriptLauncher, "_call_children_scripts", refuse)
    monkeypatch.setattr(mp_launcher.mp, "start_processes", refuse)


def _fit(module: L.LightningModule, strategy: GMCStrategy, **trainer_kwargs: Any) -> None:
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module)


@pytest.mark.usefixtures("no_rank_may_start")
@pytest.mark.parametrize("start_method", ["popen", "spawn"])
@pytest.mark.parametrize(
    ("module", "trainer_kwargs", "error", "message"),
    [
        (_Module("adam"), {}, TypeError, r"supports torch\.optim\.SGD.*got Adam.*method='ef'"),
        (_Module("nesterov"), {}, ValueError, "nesterov=False"),
        (_Module("two"), {}, ValueError, "exactly one optimizer.*returned 2"),
        (_Module("partial"), {}, ValueError, r"\['net\.bias'\] are not in the optimizer"),
        (_Manual(), {}, ValueError, "automatic optimization"),
        (_Module(), {"gradient_clip_val": 1.0}, ValueError, r"gradient_clip_val=1\.0"),
    ],
    ids=["adam", "nesterov", "two_optimizers", "parameter_not_in_optimizer", "manual", "clipping"],
)
def test_what_the_method_cannot_run_fails_before_any_rank_starts(
    module: L.LightningModule, trainer_kwargs: dict[str, Any], error: type, message: str, start_method: str
) -> None:
    with pytest.raises(error, match=message):
        _fit(module, GMCStrategy(start_method=start_method), **trainer_kwargs)  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_rank_may_start")
def test_a_valid_run_and_an_uncheckable_optimizer_reach_the_launch() -> None:
    # A valid module passes the checks, so they cannot block a good run; an optimizer that needs the
    # Trainer to be built cannot be checked before launch (it is checked at fit start, on every rank).
    for module in (_Module(), _Module("reads_trainer")):
        with pytest.raises(_ProcessesStarted):
            _fit(module, GMCStrategy())
    # the same optimizer with a method that leaves the optimizer in charge passes too
    with pytest.raises(_ProcessesStarted):
        _fit(_Module("adam"), GMCStrategy(method="ef"))


_ADAM_SCRIPT = """
import lightning as L, torch
from torch.utils.data import DataLoader, TensorDataset
from lightning_gmc import GMCStrategy

class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

if __name__ == "__main__":
    trainer = L.Trainer(strategy=GMCStrategy(), accelerator="cpu", devices=2, max_steps=1, logger=False)
    trainer.fit(M(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
"""


def test_adam_with_gmc_on_two_processes_fails_before_launch(tmp_path: Path) -> None:
    """The user study's case, as a script: the error comes from the launching process alone."""
    script = tmp_path / "adam.py"
    script.write_text(_ADAM_SCRIPT)
    start = time.perf_counter()
    proc = run_script([script], cwd=tmp_path, timeout=180, check=False)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "TypeError: method 'gmc' supports torch.optim.SGD" in proc.stderr, proc.stderr[-3000:]
    assert "Initializing distributed" not in proc.stderr + proc.stdout  # no process group, no rank 1
    print(f"Adam + gmc rejected after {elapsed:.1f} s (interpreter start and imports included)")


# ------------------------------------------------------------------------ one table of names
def test_trainer_and_fabric_register_the_same_names_with_the_same_settings() -> None:
    ours = {name for name in StrategyRegistry if StrategyRegistry[name]["strategy"] is GMCStrategy}
    fabric = {name for name in FABRIC_REGISTRY if FABRIC_REGISTRY[name]["strategy"] is GMCFabricStrategy}
    assert ours == fabric
    assert ours == {"gmc", "gmc_plus"} | set(METHODS)  # one name per method, plus GMC+
    for name in ours:
        trainer_entry, fabric_entry = StrategyRegistry[name], FABRIC_REGISTRY[name]
        assert trainer_entry["description"] == fabric_entry["description"], name
        assert trainer_entry["init_params"] == fabric_entry["init_params"], name
    assert StrategyRegistry["gmc_plus"]["init_params"] == {"compressor": "rbgs", "detach": 0.5}
    assert FABRIC_REGISTRY["ef"]["init_params"] == {"method": "ef"}
    assert "any optimizer" in FABRIC_REGISTRY["ef"]["description"]
    for name in METHODS:
        built = StrategyRegistry[name]["strategy"](**StrategyRegistry[name]["init_params"])
        assert built.gmc_config.method == name


# ------------------------------------------------------------------------------ progress bar
@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0 B"),
        (808.0, "808 B"),
        (999.4, "999 B"),
        (999.5, "1.0 kB"),
        (1234, "1.2 kB"),
        (727_200, "727.2 kB"),
        (999_960, "1.0 MB"),
        (35_700_000, "35.7 MB"),
        (4.25e9, "4.2 GB"),
        (2.5e12, "2.5 TB"),
    ],
)
def test_byte_counts_read_with_a_unit(count: float, shown: str) -> None:
    assert format_bytes(count) == shown


def test_progress_bar_shows_bytes_with_a_unit_and_logs_the_number() -> None:
    module = _Module()
    bar = TQDMProgressBar()
    trainer = L.Trainer(
        strategy=GMCStrategy(compressor="topk", density=0.5),
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        callbacks=[bar],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    raw = trainer.progress_bar_metrics["gmc/bytes_sent"]
    # one rank: nothing travels; the hook still counts what it would send (here 0 B on one rank)
    assert isinstance(raw, float)
    shown = bar.get_metrics(trainer, module)
    assert "gmc/bytes_sent" not in shown
    assert shown["gmc/sent"] == format_bytes(raw)
    assert isinstance(trainer.callback_metrics["gmc/bytes_sent"], torch.Tensor)  # logged as a number
    wrapped = bar.get_metrics
    trainer.fit(module)  # a second fit does not wrap the bar again
    assert bar.get_metrics is wrapped
