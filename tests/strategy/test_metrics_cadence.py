"""When the metrics reach Lightning: every step's values are in ``strategy.last_metrics``; Lightning's
``self.log`` (which costs about half a millisecond per metric on a CPU) gets them at the loggers'
steps, the first step and the last one, and the progress bar's two every step when a bar is shown.

The reference is the residual itself, read after every step and normed by hand."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gmc import GMCFabricStrategy, GMCStrategy


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _Recorder(L.Callback):
    """After every step: the logged residual norm, the hand-computed one, the step's own metrics."""

    def __init__(self) -> None:
        self.logged: list[float | None] = []
        self.by_hand: list[float] = []
        self.last: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        value = trainer.callback_metrics.get("gmc/residual_norm")
        self.logged.append(None if value is None else float(value))
        residual = trainer.strategy.gmc_state.worker.tensors["residual"]  # type: ignore[attr-defined]
        self.by_hand.append(float(torch.cat([r.reshape(-1) for r in residual]).double().norm()))
        self.last.append(dict(trainer.strategy.last_metrics))  # type: ignore[attr-defined]


def _fit(steps: int, every: int, batches: int = 64, **kwargs: Any) -> _Recorder:
    recorder = _Recorder()
    trainer = L.Trainer(
        strategy=GMCStrategy(compressor="topk", density=0.3),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        log_every_n_steps=every,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[recorder],
        **kwargs,
    )
    data = TensorDataset(torch.randn(batches * 2, 6, generator=torch.Generator().manual_seed(1)))
    trainer.fit(_Module(), DataLoader(data, batch_size=2))
    return recorder


def test_lightning_gets_the_metrics_at_logging_first_and_last_steps_only() -> None:
    recorder = _fit(steps=8, every=3, enable_progress_bar=False)
    handed = {0, 2, 5, 7}  # first, logging steps (3rd and 6th), last (max_steps)
    last_handed = None
    for step, (logged, by_hand) in enumerate(zip(recorder.logged, recorder.by_hand, strict=True)):
        if step in handed:
            assert logged is not None
            torch.testing.assert_close(logged, by_hand, rtol=1e-5, atol=1e-7)
            last_handed = logged
        else:
            assert logged == last_handed, step  # not handed: Lightning keeps the earlier value
    # the residual changes every step, so the stale values above are a real test
    assert len(set(round(v, 9) for v in recorder.by_hand)) == len(recorder.by_hand)
    for step, metrics in enumerate(recorder.last):
        assert ("residual_norm" in metrics) == (step in handed), step
        assert metrics["bytes_sent"] == 0.0 and "rcc" in metrics  # traffic: every step


def test_the_last_batch_of_an_epoch_hands_its_metrics_over() -> None:
    recorder = _fit(steps=-1, every=50, batches=5, max_epochs=1, enable_progress_bar=False)
    assert len(recorder.logged) == 5
    assert recorder.logged[1:4] == [recorder.logged[0]] * 3
    torch.testing.assert_close(recorder.logged[4], recorder.by_hand[4], rtol=1e-5, atol=1e-7)


def test_fabric_reads_the_residual_norm_when_asked() -> None:
    strategy = GMCFabricStrategy(compressor="topk", density=0.3)
    fabric = L.Fabric(strategy=strategy, accelerator="cpu", devices=1)
    fabric.launch()
    net = nn.Linear(6, 3)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    for _ in range(3):
        fabric.backward(model(torch.randn(4, 6)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        assert "residual_norm" not in strategy.last_metrics  # not computed unless asked for
        metrics = strategy.gmc_metrics()
        residual = strategy.gmc_state.worker.tensors["residual"]  # type: ignore[union-attr]
        by_hand = float(torch.cat([r.reshape(-1) for r in residual]).double().norm())
        torch.testing.assert_close(metrics["gmc/residual_norm"], by_hand, rtol=1e-5, atol=1e-7)
        assert metrics["gmc/nonfinite_skips"] == 0.0
