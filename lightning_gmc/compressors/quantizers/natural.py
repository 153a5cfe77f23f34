"""Natural compression ``C_nat``: stochastic rounding of every coordinate to a power of two."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_gmc.compressors.base import CompressionPlan, Payload, RandomStreams, Segment, TensorSpec
from lightning_gmc.compressors.bitpack import pack_bits, packed_nbytes, unpack_bits
from lightning_gmc.compressors.quantizers.base import BitBudgetCompressor, private_uniform
from lightning_gmc.compressors.workspace import Workspace

__all__ = ["ElementPlan", "NaturalCompression", "natural_decode", "natural_encode"]


@dataclass(frozen=True)
class ElementPlan(CompressionPlan):
    """Plan of compressors that code every coordinate independently (no scales)."""

    code_bits: int = 0


@dataclass(frozen=True)
class NaturalCompression(BitBudgetCompressor):
    """Natural compression ``C_nat`` (Horváth et al. 2019; ``docs/compressors.md``).

    Every ``|x_i|`` is rounded to ``2^floor(log2|x_i|)`` or ``2^ceil(log2|x_i|)`` without bias
    (``P(down) = (2^ceil - |x_i|) / 2^floor``) and keeps its sign. Unbiased with ``omega = 1/8``
    (attained at ``|x_i| = (4/3) 2^e``). It reads the fp32 bit pattern directly: the code is the sign
    and the (possibly incremented) 8-bit exponent, **9 bits per coordinate**, no scale. Subnormals
    dither between 0 and ``2^-126`` (unbiased, larger relative variance); values within a factor 2
    of the fp32 maximum may round up to ``inf``; NaN is sent as ``inf``.

    Use it when a near-lossless, dimension-free 3.56x reduction is wanted, or as the inner
    compressor of other schemes (SC-RC's 8-bit norms use the same rounding).
    """

    name: ClassVar[str] = "natural"
    unbiased = True

    def omega(self, numel: int) -> float:
        return 0.125

    def plan(self, segments: Sequence[Segment]) -> ElementPlan:
        numel = sum(s.numel for s in segments)
        return ElementPlan(
            tuple(segments), numel, (TensorSpec("codes", torch.uint8, packed_nbytes(numel, 9)),), code_bits=9
        )

    def payload_bits(self, plan: CompressionPlan) -> int:
        return 9 * plan.numel

    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        u = plan.workspace.tensor("u", plan.numel, torch.float32, x.device)
        private_uniform(plan, [s.numel for s in plan.segments], x, rng, step, self.name, u)
        return Payload({"codes": pack_bits(natural_encode(x, u), 9)})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        out.add_(natural_decode(unpack_bits(payload.tensors["codes"], 9, plan.numel)))


def natural_encode(x: Tensor, u: Tensor) -> Tensor:
    """9-bit natural-compression codes ``(sign << 8) | exponent`` of fp32 ``x`` given uniforms ``u``.

    With ``|x| = 2^(e-127) (1 + m / 2^23)`` the probability of rounding up is ``m / 2^23``; for
    subnormals (``e = 0``) the same formula dithers between 0 and ``2^-126``.
    """
    bits = x.contiguous().view(torch.int32)
    exponent = bits.bitwise_right_shift(23).bitwise_and_(0xFF)
    p_up = bits.bitwise_and(0x7FFFFF).to(torch.float32).mul_(2.0**-23)
    exponent.add_(torch.lt(u, p_up)).clamp_(max=255)
    return exponent.bitwise_or_(torch.signbit(x).to(torch.int32).bitwise_left_shift_(8))


def natural_decode(codes: Tensor) -> Tensor:
    """fp32 values of 9-bit natural-compression codes."""
    exponent = codes.bitwise_and(0xFF).to(torch.int32).bitwise_left_shift_(23)
    value = exponent.view(torch.float32)
    negative = codes.bitwise_right_shift(8).bool()
    return torch.where(negative, -value, value)
