"""Ternary and sign quantizers: TernGrad (unbiased) and scaled sign (contractive, EF-signSGD)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_gmc.compressors.base import CompressionPlan, Payload, RandomStreams
from lightning_gmc.compressors.bitpack import pack_bits, pack_trits, unpack_bits, unpack_trits
from lightning_gmc.compressors.quantizers.base import GroupPlan, GroupQuantizer, private_uniform
from lightning_gmc.compressors.workspace import Workspace

__all__ = ["ScaledSign", "TernGrad"]

_TRIT_VALUES = torch.tensor([0.0, 1.0, -1.0])


@dataclass(frozen=True)
class TernGrad(GroupQuantizer):
    """TernGrad (Wen et al. 2017): ``C(x) = ||x||_inf sign(x) b``, ``b_i ~ Bernoulli(|x_i| / ||x||_inf)``.

    Unbiased with worst-case ``omega = (sqrt(d) - 1) / 2`` (about 3 for Gaussian x at any large d).
    The trits are packed five per byte: ``32`` per group ``+ 8 ceil(d / 5)`` bits, 1.6 bits per
    coordinate against the entropy ``log2 3 = 1.585``. No gradient clipping (GRACE's 2.5 std clip
    makes it biased).

    Args:
        block_size: norm-group length inside a parameter, ``None`` for one group per parameter.
    """

    name: ClassVar[str] = "terngrad"
    unbiased = True
    ternary: ClassVar[bool] = True

    def code_bits(self) -> int:
        return 0

    def omega(self, numel: int) -> float:
        return (math.sqrt(self.group_length(numel)) - 1.0) / 2.0

    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        assert isinstance(plan, GroupPlan)
        scale = plan.reduce_norm(x, math.inf)
        inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
        y = plan.workspace.tensor("y", plan.numel, torch.float32, x.device)
        plan.scale_(torch.abs(x, out=y), inv)
        u = plan.workspace.tensor("u", plan.numel, torch.float32, x.device)
        private_uniform(plan, [s.numel for s in plan.segments], x, rng, step, self.name, u)
        keep = torch.lt(u, y)
        # trit = 0 (zero), 1 (+scale), 2 (-scale)
        trits = torch.signbit(x).to(torch.uint8).add_(1).mul_(keep)
        return Payload({"scales": scale, "codes": pack_trits(trits)})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        assert isinstance(plan, GroupPlan)
        trits = unpack_trits(payload.tensors["codes"], plan.numel)
        # 0 -> 0, 1 -> +1, 2 -> -1
        value = _TRIT_VALUES.to(out.device)[trits.long()]
        plan.scale_(value, payload.tensors["scales"])
        out.add_(value)


@dataclass(frozen=True)
class ScaledSign(GroupQuantizer):
    """Scaled sign / EF-signSGD (Karimireddy et al. 2019): ``C(x) = (||x||_1 / d) sign(x)``.

    Deterministic and contractive with ``delta(x) = ||x||_1^2 / (d ||x||^2)``: worst case ``1/d``
    (one-hot x), about ``2/pi = 0.637`` for Gaussian x. Bits: ``32`` per group ``+ d``. Zeros are sent
    as ``+``; that does not change ``delta`` because ``<C(x), x> = ||x||_1^2 / d`` either way. Use it
    with error feedback only (it is biased); ``block_size`` raises the worst case to
    ``1 / block_size``.

    Args:
        block_size: norm-group length inside a parameter, ``None`` for one group per parameter.
    """

    name: ClassVar[str] = "scaled_sign"
    unbiased = False

    def code_bits(self) -> int:
        return 1

    def delta(self, numel: int) -> float:
        return 1.0 / self.group_length(numel)

    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        assert isinstance(plan, GroupPlan)
        scale = plan.reduce_norm(x, 1.0).div_(plan.lengths(x.device))
        return Payload({"scales": scale, "codes": pack_bits(torch.signbit(x), 1)})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        assert isinstance(plan, GroupPlan)
        bits = unpack_bits(payload.tensors["codes"], 1, plan.numel)
        value = bits.to(torch.float32).mul_(-2.0).add_(1.0)
        plan.scale_(value, payload.tensors["scales"])
        out.add_(value)
