"""The hook on one GPU (marked ``cuda``; skipped without a CUDA device).

Run by ``tools/device_check.sh``. With world size 1 Lightning still wraps the model in DDP, so
every step runs :func:`~lightning_gmc.gmc_hook`. References:

* the same Lightning run on CPU, for every method and every compressor whose draws do not depend on
  the device (CUDA and CPU generators give different random numbers): equal up to float rounding of
  the forward/backward (``rtol=1e-4``);
* for device-dependent random compressors: the GPU run reproduces itself bit for bit and counts the
  same traffic as the CPU run (the plan fixes it);
* bf16-mixed: close to the fp32 GPU run;
* checkpoint/resume: a run interrupted and resumed equals the uninterrupted run bit for bit;
* a 2-rank gloo run with CUDA tensors (both ranks on GPU 0) against plain DDP + SGD(momentum).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers import make_dataset, make_model
from launch import TESTS, run_script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gmc import GMCStrategy

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

STEPS = 4
#: Compressors whose selection and values do not depend on the device's random generator.
DEVICE_INDEPENDENT = ["none", "topk", "topk_approx", "rbgs", "scaled_sign"]
#: Compressors drawing from torch generators (different numbers on CUDA and CPU).
DEVICE_RANDOM = ["randk", "qsgd", "natural", "natural_dithering", "terngrad", "sd_l1", "spherical_rc"]
METHODS = ["gmc", "dgc", "cser", "def_a", "dmsgd", "ef_server_momentum", "gmc_lr_inside"]


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model("small")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def _fit(
    accelerator: str,
    strategy_kwargs: dict[str, Any],
    max_steps: int = STEPS,
    precision: str = "32-true",
    ckpt_in: str | None = None,
    ckpt_out: str | None = None,
) -> tuple[dict[str, torch.Tensor], GMCStrategy]:
    strategy = GMCStrategy(**strategy_kwargs)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=accelerator,
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    x, y = make_dataset(32)  # 4 batches: one epoch is STEPS steps, so checkpoints fall on epoch ends
    module = _Module()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    assert strategy.gmc_state.hook_calls >= max_steps  # the hook ran (world size 1 still has DDP)
    params = {name: p.detach().cpu().clone() for name, p in module.named_parameters()}
    return params, strategy


def _kwargs(method: str, compressor: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"method": method, "compressor": compressor, "density": 0.25, "seed": 3}
    if method == "gmc" and compressor == "rbgs":
        kwargs["detach"] = 0.5  # GMC+: the detached point on the GPU too
    return kwargs


def _assert_close(gpu: dict[str, torch.Tensor], cpu: dict[str, torch.Tensor]) -> None:
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("compressor", DEVICE_INDEPENDENT)
def test_gmc_on_gpu_equals_cpu(compressor: str) -> None:
    gpu, strategy = _fit("gpu", _kwargs("gmc", compressor))
    cpu, _ = _fit("cpu", _kwargs("gmc", compressor))
    _assert_close(gpu, cpu)
    assert strategy.gmc_state.worker is not None and strategy.gmc_state.worker.device.type == "cuda"


@pytest.mark.parametrize("compressor", DEVICE_RANDOM)
def test_random_compressors_on_gpu_reproduce_and_count_like_cpu(compressor: str) -> None:
    first, strategy = _fit("gpu", _kwargs("gmc", compressor))
    second, _ = _fit("gpu", _kwargs("gmc", compressor))
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert torch.isfinite(first[name]).all(), name
    _, cpu_strategy = _fit("cpu", _kwargs("gmc", compressor))
    gpu_stats, cpu_stats = strategy.gmc_state.stats.state_dict(), cpu_strategy.gmc_state.stats.state_dict()
    assert gpu_stats["bytes_sent_total"] == cpu_stats["bytes_sent_total"]
    assert gpu_stats["dense_bytes_total"] == cpu_stats["dense_bytes_total"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_gpu_equals_cpu(method: str) -> None:
    compressor = "none" if method == "dmsgd" else "topk"
    kwargs = _kwargs(method, compressor)
    if method in ("def_a",):
        kwargs["detach"] = 0.3  # the detached point, on the GPU
    gpu, _ = _fit("gpu", kwargs)
    cpu, _ = _fit("cpu", kwargs)
    _assert_close(gpu, cpu)


def test_bf16_mixed_on_gpu_is_close_to_fp32() -> None:
    kwargs = _kwargs("gmc", "rbgs")
    bf16, _ = _fit("gpu", kwargs, precision="bf16-mixed")
    again, _ = _fit("gpu", kwargs, precision="bf16-mixed")
    fp32, _ = _fit("gpu", kwargs)
    for name in fp32:
        assert torch.equal(bf16[name], again[name]), name
        torch.testing.assert_close(bf16[name], fp32[name], rtol=5e-2, atol=5e-3, msg=name)


def test_checkpoint_resume_on_gpu_is_bitwise(tmp_path: Path) -> None:
    kwargs = _kwargs("gmc", "rbgs")  # GMC+: residual, momentum and the detached point
    straight, whole = _fit("gpu", kwargs, max_steps=2 * STEPS)
    ckpt = str(tmp_path / "half.ckpt")
    _fit("gpu", kwargs, max_steps=STEPS, ckpt_out=ckpt)
    resumed, rest = _fit("gpu", kwargs, max_steps=2 * STEPS, ckpt_in=ckpt)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    a, b = whole.gmc_state.state_dict(), rest.gmc_state.state_dict()
    for scope in ("shared", "local"):
        for buffer, by_name in a[scope].items():
            for name, tensor in by_name.items():
                assert torch.equal(tensor, b[scope][buffer][name]), (scope, buffer, name)


def test_two_gloo_ranks_with_cuda_tensors_equal_ddp_sgd() -> None:
    """Gloo's all-reduce and all-gather of CUDA tensors, both ranks on GPU 0 (see the script)."""
    result = run_script([TESTS / "cuda_gloo_script.py"], timeout=300)  # spawns the two ranks itself
    assert "OK" in result.stdout
