"""Random dithering onto ``s + 1`` levels: QSGD's uniform levels and natural dithering's powers of two."""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_gmc._arguments import check_int
from lightning_gmc.compressors.base import CompressionPlan, Payload, RandomStreams
from lightning_gmc.compressors.bitpack import pack_bits, unpack_bits
from lightning_gmc.compressors.quantizers.base import GroupPlan, GroupQuantizer, check_norm, private_uniform
from lightning_gmc.compressors.workspace import Workspace

__all__ = ["NaturalDithering", "RandomDithering"]


@dataclass(frozen=True)
class _LevelDithering(GroupQuantizer):
    """Random dithering onto ``s + 1`` levels of ``|x_i| / ||x_g||_p`` with a sign bit per code.

    ``norm`` also accepts the strings ``"inf"``, ``"linf"`` and ``"max"``; it is stored as a float.
    """

    unbiased = True
    levels: int = 1
    norm: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "levels", check_int("levels", self.levels, minimum=1))
        object.__setattr__(self, "norm", check_norm(self.norm))

    def code_bits(self) -> int:
        # sign + level index in [0, s]: a fixed-length code (Alistarh et al. 2017, QSGD).
        return 1 + math.ceil(math.log2(self.levels + 1))

    def describe(self) -> str:
        return f"{super().describe()}, levels={self.levels}, norm={self.norm:g}"

    @abstractmethod
    def _level_index(self, y: Tensor, u: Tensor) -> Tensor:
        """Random level index in ``[0, s]`` of ``y = |x| / ||x||_p`` (in ``[0, 1]``), unbiased."""

    @abstractmethod
    def _level_value(self, index: Tensor) -> Tensor:
        """Value (in units of the group norm) of a level index."""

    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        assert isinstance(plan, GroupPlan)
        norms = plan.reduce_norm(x, self.norm)
        inv = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
        y = plan.workspace.tensor("y", plan.numel, torch.float32, x.device)
        torch.abs(x, out=y)
        plan.scale_(y, inv)
        u = plan.workspace.tensor("u", plan.numel, torch.float32, x.device)
        private_uniform(plan, [s.numel for s in plan.segments], x, rng, step, self.name, u)
        index = self._level_index(y, u)
        # code = (level << 1) | sign, sign = 1 for negative coordinates.
        code = index.bitwise_left_shift_(1).bitwise_or_(torch.signbit(x).to(index.dtype))
        return Payload({"scales": norms, "codes": pack_bits(code, plan.code_bits)})

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        assert isinstance(plan, GroupPlan)
        code = unpack_bits(payload.tensors["codes"], plan.code_bits, plan.numel)
        value = self._level_value(code.bitwise_right_shift(1))
        value.mul_(code.bitwise_and_(1).mul_(-2).add_(1))  # 1 - 2 * sign_bit
        plan.scale_(value, payload.tensors["scales"])
        out.add_(value)


@dataclass(frozen=True)
class RandomDithering(_LevelDithering):
    """Random dithering / QSGD with ``s`` uniform levels (Alistarh et al. 2017; ``docs/compressors.md``).

    ``C(x) = ||x||_p * sign(x) * xi / s`` with ``xi_i = floor(y_i) + Bernoulli(frac(y_i))`` and
    ``y_i = s |x_i| / ||x||_p``: unbiased, with ``omega = min(d^{2/r}/(4 s^2), d^{1/r}/s)`` and
    ``r = min(p, 2)`` (for ``p = 2`` this is the QSGD bound ``min(d/s^2, sqrt(d)/s)``
    improved by the factor 1/4 on its first term, derived from ``f(1-f) <= 1/4``). Bits:
    ``32`` per norm group ``+ d (1 + ceil(log2(s+1)))``.

    Use it as the classic quantization baseline; with a small ``block_size`` (QSGD uses 512) it is a
    robust 2-4 bit/coordinate compressor. ``p = 1`` with the same dense code is sparse dithering's
    unconstrained cousin (see ``sd_l1`` for the bit-efficient sparse code).

    Args:
        levels: number of quantization levels ``s >= 1``.
        norm: ``2`` (QSGD), ``inf`` or ``1``: the norm that scales each group.
        block_size: norm-group length inside a parameter, ``None`` for one group per parameter.
    """

    name: ClassVar[str] = "qsgd"

    def omega(self, numel: int) -> float:
        d = self.group_length(numel)
        r = min(self.norm, 2.0)
        s = self.levels
        return min(d ** (2.0 / r) / (4.0 * s * s), d ** (1.0 / r) / s)

    def _level_index(self, y: Tensor, u: Tensor) -> Tensor:
        y.mul_(self.levels)
        low = torch.floor(y)
        # u < frac(y) rounds up with probability frac(y): unbiased. Rounding noise in ||x|| can push y
        # a hair above s, hence the clamp.
        up = torch.lt(u, y.sub_(low))
        return low.add_(up).clamp_(max=self.levels).to(torch.int64)

    def _level_value(self, index: Tensor) -> Tensor:
        return index.to(torch.float32).div_(self.levels)


@dataclass(frozen=True)
class NaturalDithering(_LevelDithering):
    """Natural dithering (Horváth et al. 2019; ``docs/compressors.md``): dithering onto the
    power-of-two levels ``{0, 2^{1-s}, ..., 1/2, 1}`` of ``|x_i| / ||x||_p``.

    Unbiased with ``omega = 1/8 + d^{1/r} 2^{1-s} min(1, d^{1/r} 2^{1-s})``, ``r = min(p, 2)``; bits
    ``32`` per group ``+ d (1 + ceil(log2(s+1)))``. The levels follow the exponent grid, so large
    entries keep ~1/8 relative variance like natural compression while small ones are dithered to
    zero; a good 3-5 bit/coordinate choice.

    Args:
        levels: number of non-zero levels ``s >= 1``.
        norm: ``2`` (default), ``inf`` or ``1``.
        block_size: norm-group length inside a parameter, ``None`` for one group per parameter.
    """

    name: ClassVar[str] = "natural_dithering"

    def omega(self, numel: int) -> float:
        d = self.group_length(numel)
        r = min(self.norm, 2.0)
        t = d ** (1.0 / r) * 2.0 ** (1 - self.levels)
        return 0.125 + t * min(1.0, t)

    def _level_index(self, y: Tensor, u: Tensor) -> Tensor:
        s = self.levels
        mantissa, exponent = torch.frexp(y)  # y = m 2^E, m in [0.5, 1): floor(log2 y) = E - 1
        exponent = exponent.to(torch.int64).sub_(1)
        on_grid = exponent.ge(1 - s)
        # Between 2^e and 2^(e+1): P(up) = (y - 2^e) / 2^e = 2m - 1.
        # Below the smallest level 2^(1-s): between 0 and 2^(1-s), P(up) = y / 2^(1-s).
        p_up = torch.where(on_grid, mantissa.mul_(2.0).sub_(1.0), y.mul(2.0 ** (s - 1)))
        low = torch.where(on_grid, exponent.add_(s), torch.zeros_like(exponent))
        return low.add_(torch.lt(u, p_up)).clamp_(max=s)

    def _level_value(self, index: Tensor) -> Tensor:
        ones = torch.ones(index.shape, dtype=torch.float32, device=index.device)
        value = torch.ldexp(ones, index - self.levels)
        return value.masked_fill_(index.eq(0), 0.0)
