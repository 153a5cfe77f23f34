"""Models of the GMC paper's experiments and the LightningModule that trains them.

* :class:`ResNet20`: the CIFAR ResNet of He et al. (2016), 3 stages x 3 basic blocks, with BatchNorm
  (IID runs) or GroupNorm with 2 groups (non-IID runs, as Lin et al.'s ResNet-GN-20;
  ``docs/algorithms.md`` section 4.1). About 0.27M parameters.
* :class:`ViT`: the plain ViT of Lee et al. (2021) for 32x32 inputs (patch 4, dim 192, 12 heads of 16,
  MLP ratio 2) with the 4 Transformer blocks the GMC paper uses; no SPT/LSA. About 1.21M parameters
  for 10 classes, 1.23M for 100.
* :class:`DigitsCNN` and :class:`MLP`: small models for the offline digits and synthetic data sets.
* :class:`ClassificationModule`: cross-entropy training with ``SGD(lr, momentum, weight_decay)`` (or
  ``AdamW``, for ``method="ef"``) and a cosine schedule stepped once per epoch, logging
  ``train/loss`` (per step, this rank), ``train/loss_epoch`` (epoch mean over all ranks),
  ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["MLP", "BasicBlock", "ClassificationModule", "DigitsCNN", "ResNet20", "ViT", "count_parameters"]

NormKind = Literal["bn", "gn"]


def _norm2d(kind: NormKind, channels: int, groups: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be 'bn' or 'gn', got {kind!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with normalisation and a residual connection.

    ``shortcut="conv"`` uses a 1x1 convolution + normalisation when the shape changes (Lin et al.'s
    code, the model behind the paper's ResNet-GN-20); ``"pad"`` uses the parameter-free
    subsample-and-zero-pad shortcut ("option A" of He et al.).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        norm: NormKind,
        groups: int,
        shortcut: Literal["conv", "pad"],
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm2d(norm, out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm2d(norm, out_ch, groups)
        self.shortcut_kind = shortcut
        self.pad = out_ch - in_ch
        self.stride = stride
        self.downsample: nn.Module | None = None
        if (stride != 1 or in_ch != out_ch) and shortcut == "conv":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _norm2d(norm, out_ch, groups)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.downsample is not None:
            res = self.downsample(x)
        elif self.stride != 1 or self.pad:
            # Option A: take every stride-th pixel and append zero channels.
            res = x[:, :, :: self.stride, :: self.stride]
            res = F.pad(res, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            res = x
        return F.relu(out + res)


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images (He et al., 2016): conv 16, 3 stages of 3 blocks (16/32/64), pool, FC.

    Args:
        num_classes: output classes.
        norm: ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm).
        gn_groups: groups for GroupNorm (2 as in Lin et al.'s ResNet-GN-20).
        shortcut: ``"conv"`` (1x1 projection) or ``"pad"`` (zero-padding, parameter-free).
        in_channels: input channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        norm: NormKind = "bn",
        gn_groups: int = 2,
        shortcut: Literal["conv", "pad"] = "conv",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.norm1 = _norm2d(norm, 16, gn_groups)
        blocks: list[nn.Module] = []
        in_ch = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(3):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride, norm, gn_groups, shortcut))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He initialisation (fan-out), as in the reference CIFAR ResNet code.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class _Attention(nn.Module):
    """Multi-head self-attention: bias-free fused qkv projection, output projection with bias."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        # Default scale 1/sqrt(dim_head), as in the reference (no LSA temperature).
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class _Block(nn.Module):
    """Pre-norm Transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` with GELU."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The small ViT of Lee et al. (2021) with ``depth`` blocks (the GMC paper uses 4).

    Patches of ``patch_size`` pixels are flattened in (row, column, channel) order and projected
    linearly; a learnable CLS token and positional embedding are added; the head is ``LayerNorm`` +
    ``Linear`` on the CLS token. Linear weights use Xavier-normal initialisation with zero bias; the CLS
    token and positional embedding are standard normal, as in the reference code.

    Args:
        num_classes: output classes.
        image_size: input height and width.
        patch_size: patch side.
        dim: token width.
        depth: number of Transformer blocks.
        heads: attention heads.
        dim_head: width per head.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        channels: input channels.
        dropout: dropout inside the blocks.
        emb_dropout: dropout after the embedding.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 4,
        heads: int = 12,
        dim_head: int = 16,
        mlp_ratio: int = 2,
        channels: int = 3,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.to_patch = nn.Linear(channels * patch_size * patch_size, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.blocks = nn.Sequential(
            *[_Block(dim, heads, dim_head, dim * mlp_ratio, dropout) for _ in range(depth)]
        )
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, img: Tensor) -> Tensor:
        """``B x C x H x W`` -> ``B x (H/p * W/p) x (p * p * C)``, patches in row-major order."""
        b, c, h, w = img.shape
        p = self.patch_size
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, img: Tensor) -> Tensor:
        x = self.to_patch(self.patchify(img))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding[:, : x.shape[1] + 1]
        x = self.blocks(self.emb_dropout(x))
        return self.head(x[:, 0])


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 digits: two 3x3 convolutions (16, 32 channels; the second with stride 2), FC.

    About 10k parameters, so a CPU step takes well under a millisecond and the demo finishes quickly.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` hidden layers and a linear classifier.

    Args:
        in_features: flattened input size (64 for digits, ``num_features`` for the synthetic data).
        num_classes: output classes.
        hidden: widths of the hidden layers.
    """

    def __init__(
        self, in_features: int = 64, num_classes: int = 10, hidden: tuple[int, ...] = (128,)
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ClassificationModule(LightningModule):
    """Cross-entropy classification with SGD + momentum + weight decay (or AdamW) and a per-epoch cosine
    schedule.

    The schedule is ``CosineAnnealingLR(T_max=max_epochs)`` stepped once per epoch, i.e.
    ``lr_e = lr * (1 + cos(pi * e / max_epochs)) / 2`` in epoch ``e``: the paper's setting
    (GMC paper, section 5.1: cosine per epoch, no warm-up).

    Args:
        model: the network; it should expose ``num_classes`` unless ``num_classes`` is given here.
        lr: initial learning rate ``eta_0``.
        momentum: SGD momentum ``beta`` (unused by AdamW).
        weight_decay: SGD: coupled L2 weight decay (added to the gradient by the optimizer); AdamW:
            decoupled weight decay.
        max_epochs: cosine period in epochs; ``None`` (the configs' choice) uses ``trainer.max_epochs``,
            so that overriding the Trainer's epochs moves the schedule with it; a value that differs
            from the Trainer's warns.
        num_classes: number of classes for the accuracy metric; ``None`` reads ``model.num_classes``.
        optimizer: ``"sgd"`` (``SGD(lr, momentum, weight_decay)``, what every GMC-paper method needs)
            or ``"adamw"`` (``AdamW(lr, betas, weight_decay)``, for ``GMCStrategy(method="ef")`` and
            plain DDP).
        betas: AdamW's ``(beta1, beta2)``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        max_epochs: int | None = None,
        num_classes: int | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        # The model is a module (already saved in the state dict); keep it out of hparams.yaml.
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        if classes is None:
            raise ValueError("pass num_classes or use a model with a num_classes attribute")
        self.num_classes = int(classes)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.optimizer_name = optimizer
        self.betas = (float(betas[0]), float(betas[1]))
        self.train_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        # Per-step loss is rank-local (syncing it would add an all-reduce to every step of a run whose
        # point is to measure communication); the epoch mean is synchronised once per epoch.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        # Ranks evaluate disjoint slices; sync_dist averages the per-rank losses and the metric object
        # gathers its counts, so the logged accuracy is the one of the whole evaluation set.
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        """``SGD(lr, momentum, weight_decay)`` (or AdamW) and ``CosineAnnealingLR`` stepped every epoch."""
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(
                self.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        trainer_epochs = self.trainer.max_epochs if self._trainer is not None else None
        epochs = self.max_epochs
        if epochs is None:
            epochs = trainer_epochs
        elif trainer_epochs is not None and trainer_epochs > 0 and epochs != trainer_epochs:
            rank_zero_warn(
                f"the cosine period max_epochs={epochs} of the model differs from the Trainer's "
                f"max_epochs={trainer_epochs}: the learning rate "
                + ("stops before it decays to zero" if trainer_epochs < epochs else "rises again after zero")
                + ". Leave the model's max_epochs unset (null in a config) to follow the Trainer's."
            )
        if epochs is None or epochs < 1:
            # max_epochs=-1 (infinite) or no trainer: a cosine period is undefined, keep the LR constant.
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
