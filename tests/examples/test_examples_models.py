"""Model parameter counts (against hand-written formulas), forward shapes and ClassificationModule."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.data import DigitsDataModule  # noqa: E402
from examples.models import MLP, ClassificationModule, DigitsCNN, ResNet20, ViT  # noqa: E402


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet20_formula(classes: int, shortcut: str) -> int:
    """ResNet-20 for CIFAR: conv3x3(3->16); 3 stages x 3 blocks of two 3x3 convs (16, 32, 64 channels);
    a norm (2 affine params per channel) after every conv; optional 1x1 projection + norm at the two
    downsampling blocks; FC 64 -> classes. Convolutions have no bias."""
    convs = 3 * 16 * 9
    norm_channels = 16
    in_ch = 16
    for width in (16, 32, 64):
        for _ in range(3):
            convs += in_ch * width * 9 + width * width * 9
            norm_channels += 2 * width
            if shortcut == "conv" and in_ch != width:
                convs += in_ch * width
                norm_channels += width
            in_ch = width
    return convs + 2 * norm_channels + 64 * classes + classes


def _vit_formula(classes: int, depth: int = 4, dim: int = 192, heads: int = 12, dim_head: int = 16) -> int:
    """ViT of Lee et al. (docs/algorithms.md 4.1): patch 4, 32x32 (64 patches, 48 values each), CLS +
    positional embedding (65 x dim), per block LN + qkv (no bias) + out proj + LN + MLP (ratio 2);
    head LN + Linear."""
    inner = heads * dim_head
    patch = 4 * 4 * 3 * dim + dim
    embeddings = 65 * dim + dim
    ln = 2 * dim
    attention = dim * 3 * inner + inner * dim + dim  # qkv without bias, output projection with bias
    mlp = dim * 2 * dim + 2 * dim + 2 * dim * dim + dim  # Linear(dim, 2 dim) and Linear(2 dim, dim)
    block = ln + attention + ln + mlp
    head = 2 * dim + dim * classes + classes
    return patch + embeddings + depth * block + head


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize("shortcut", ["conv", "pad"])
def test_resnet20_parameter_count(classes: int, norm: str, shortcut: str) -> None:
    model = ResNet20(num_classes=classes, norm=norm, shortcut=shortcut)  # type: ignore[arg-type]
    expected = _resnet20_formula(classes, shortcut)
    assert _count(model) == expected
    # "about 0.27M" (docs/algorithms.md 4.1); CIFAR-100 adds 90 x 65 head parameters.
    assert abs(expected - 270_000) < 10_000


def test_resnet20_norm_layers() -> None:
    bn = ResNet20(norm="bn")
    gn = ResNet20(norm="gn")
    assert not any(isinstance(m, nn.GroupNorm) for m in bn.modules())
    gns = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == 2 for m in gns)  # Lin et al.'s ResNet-GN-20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    # 19 convolutions + 2 projections -> 21 norm layers with the conv shortcut.
    assert len(gns) == 21


@pytest.mark.parametrize("classes,approx", [(10, 1.21e6), (100, 1.23e6)])
def test_vit_parameter_count(classes: int, approx: float) -> None:
    model = ViT(num_classes=classes)
    expected = _vit_formula(classes)
    assert _count(model) == expected
    assert round(expected / 1e4) == round(approx / 1e4)  # 1.21M / 1.23M, counted by hand
    assert len(model.blocks) == 4


def test_vit_patch_order_matches_reference_layout() -> None:
    # Reference layout 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', written out with explicit loops.
    model = ViT(image_size=8, patch_size=4, dim=8, depth=1, heads=2, dim_head=4, channels=3)
    img = torch.randn(2, 3, 8, 8)
    got = model.patchify(img)
    ref = torch.empty(2, 4, 48)
    for hh in range(2):
        for ww in range(2):
            for p1 in range(4):
                for p2 in range(4):
                    for c in range(3):
                        ref[:, hh * 2 + ww, (p1 * 4 + p2) * 3 + c] = img[:, c, hh * 4 + p1, ww * 4 + p2]
    assert torch.equal(got, ref)


def test_vit_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=4, dim=12, depth=1, heads=3, dim_head=4)
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 12)
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 5, 3, 4).transpose(1, 2)

    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    ref = attn.to_out((w @ split(v)).transpose(1, 2).reshape(2, 5, 12))
    assert torch.allclose(attn(x), ref, atol=1e-6)


@pytest.mark.parametrize(
    "model,shape,classes",
    [
        (ResNet20(num_classes=10, norm="bn"), (3, 32, 32), 10),
        (ResNet20(num_classes=100, norm="gn"), (3, 32, 32), 100),
        (ResNet20(num_classes=10, shortcut="pad"), (3, 32, 32), 10),
        (ViT(num_classes=10), (3, 32, 32), 10),
        (ViT(num_classes=100), (3, 32, 32), 100),
        (DigitsCNN(), (1, 8, 8), 10),
        (MLP(in_features=64, num_classes=10), (1, 8, 8), 10),
        (MLP(in_features=32, num_classes=4, hidden=(16, 16)), (32,), 4),
    ],
)
def test_forward_shapes(model: nn.Module, shape: tuple[int, ...], classes: int) -> None:
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_small_model_sizes() -> None:
    # DigitsCNN: conv 1->16 (3x3, bias), conv 16->32 (3x3, bias), FC 32*4*4 -> 10.
    assert _count(DigitsCNN()) == (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (512 * 10 + 10)
    assert _count(MLP(64, 10, (128,))) == 64 * 128 + 128 + 128 * 10 + 10


def test_optimizer_and_per_epoch_cosine() -> None:
    module = ClassificationModule(DigitsCNN(), lr=0.2, momentum=0.9, weight_decay=1e-4, max_epochs=5)
    conf = module.configure_optimizers()
    opt = conf["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.9, 1e-4)
    assert group["dampening"] == 0 and not group["nesterov"]
    sched = conf["lr_scheduler"]
    assert sched["interval"] == "epoch"
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    # eta_e = eta_0 (1 + cos(pi e / E)) / 2 for e = 0..E-1 (the paper's section 5.1).
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_module_needs_num_classes() -> None:
    with pytest.raises(ValueError):
        ClassificationModule(nn.Linear(4, 2))
    assert ClassificationModule(nn.Linear(4, 2), num_classes=2).num_classes == 2


def test_digits_training_learns_and_logs(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0)
    dm = DigitsDataModule(batch_size=32)
    module = ClassificationModule(DigitsCNN(), lr=0.1)
    trainer = Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in metrics
    assert float(metrics["val/acc"]) > 0.8  # 10 classes: chance is 0.1
    # The cosine schedule was stepped per epoch with T_max = trainer.max_epochs.
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 3)), abs=1e-12)
    res = trainer.test(module, datamodule=dm, verbose=False)
    assert res[0]["test/acc"] > 0.8
