"""Error-feedback scaling: an unbiased ``C`` in ``U(omega)`` becomes the contractive ``C / (1 + omega)``.

Error-feedback methods assume a delta-approximate (contractive) compressor, GMC paper §3.3,
Assumption 1: ``E||C(x) - x||^2 <= (1 - delta) ||x||^2``; an unbiased compressor with variance
parameter ``omega`` satisfies it after division by ``1 + omega``, with ``delta = 1 / (1 + omega)``
(``docs/compressors.md``, "Error-feedback scaling").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor

from lightning_gmc.compressors.base import CompressionPlan, Compressor, Payload, RandomStreams, Segment
from lightning_gmc.compressors.sparse import Identity
from lightning_gmc.compressors.workspace import Workspace

__all__ = ["HasOmega", "ScaledCompressor", "ScaledPlan", "scale_for_error_feedback"]


@runtime_checkable
class HasOmega(Protocol):
    """A compressor that states its variance parameter ``omega`` per parameter size."""

    def omega(self, numel: int) -> float: ...


@dataclass(frozen=True)
class ScaledPlan(CompressionPlan):
    """Plan of :class:`ScaledCompressor`: the inner plan and one factor per segment."""

    inner: CompressionPlan = field(default_factory=lambda: CompressionPlan((), 0, ()))
    factors: tuple[float, ...] = ()


@dataclass(frozen=True)
class ScaledCompressor(Compressor):
    """``C'(x) = C(x) / (1 + omega)`` for an unbiased ``C`` in ``U(omega)`` (``docs/compressors.md``).

    ``C'`` is contractive with ``delta = 1 / (1 + omega)`` and sends exactly the bits of ``C``: the
    receivers decode and rescale. Use it whenever an unbiased compressor feeds an error-feedback
    method (EF-SGD, GMC, EF21): plain unbiased compressors have ``E||C(x) - x||^2 = omega ||x||^2``,
    which exceeds ``||x||^2`` when ``omega > 1`` and makes the residual grow. Do not use it with
    methods that rely on ``E[C(x)] = x`` (DIANA, plain compressed SGD without memory).

    The factor is per parameter, ``1 / (1 + omega(numel))`` with that parameter's ``omega``: for one
    parameter this is exactly ``C / (1 + omega)``; for several, each segment is contractive on its
    own, hence the whole vector with the smallest ``delta``.

    Args:
        inner: an unbiased compressor with an ``omega(numel)`` method.
    """

    name: ClassVar[str] = "scaled"
    unbiased = False
    sparse: ClassVar[bool] = False
    inner: Compressor

    def __post_init__(self) -> None:
        inner = self.inner
        if not inner.unbiased or not isinstance(inner, HasOmega):
            raise TypeError(f"{inner!r} must be unbiased and define omega(numel) to be scaled by 1/(1+omega)")
        if inner.shared_support:
            raise TypeError(f"{inner!r}: scaling shared-support compressors is not supported")

    def omega_of(self, numel: int) -> float:
        """``omega`` of the inner compressor for one parameter."""
        assert isinstance(self.inner, HasOmega)  # checked in __post_init__
        return float(self.inner.omega(numel))

    def delta(self, numel: int) -> float:
        """Contraction parameter ``1 / (1 + omega)``."""
        return 1.0 / (1.0 + self.omega_of(numel))

    def delta_of_plan(self, plan: CompressionPlan) -> float:
        return min(self.delta(seg.numel) for seg in plan.segments)

    def plan(self, segments: Sequence[Segment]) -> ScaledPlan:
        inner = self.inner.plan(segments)
        factors = tuple(1.0 / (1.0 + self.omega_of(seg.numel)) for seg in inner.segments)
        return ScaledPlan(inner.segments, inner.numel, inner.payload, inner=inner, factors=factors)

    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        assert isinstance(plan, ScaledPlan)
        return self.inner.compress(x, plan.inner, rng, step, workspace)

    def decompress_add(self, payload: Payload, plan: CompressionPlan, out: Tensor) -> None:
        assert isinstance(plan, ScaledPlan)
        decoded = plan.workspace.tensor("decoded", plan.numel, out.dtype, out.device)
        decoded.zero_()
        self.inner.decompress_add(payload, plan.inner, decoded)
        for seg, factor in zip(plan.segments, plan.factors, strict=True):
            sl = slice(seg.offset, seg.offset + seg.numel)
            out[sl].add_(decoded[sl], alpha=factor)

    def nnz(self, plan: CompressionPlan) -> int:
        assert isinstance(plan, ScaledPlan)
        return self.inner.nnz(plan.inner)

    def payload_bits(self, plan: CompressionPlan) -> int:
        assert isinstance(plan, ScaledPlan)
        return self.inner.payload_bits(plan.inner)

    def broadcast_bits(self, payloads: Sequence[Payload], plan: CompressionPlan) -> int:
        assert isinstance(plan, ScaledPlan)
        return self.inner.broadcast_bits(payloads, plan.inner)

    def describe(self) -> str:
        return f"{self.inner.describe()}, scaled by 1/(1+omega)"


def scale_for_error_feedback(compressor: Compressor) -> Compressor:
    """Return the compressor to use inside an error-feedback method: ``C / (1 + omega)`` for unbiased
    ``C``, a value equal to any other scaling of an equal compressor.

    * unbiased with ``omega > 0`` (``qsgd``, ``natural``, ``natural_dithering``, ``terngrad``,
      ``sd_l1``, ``spherical_rc`` unbiased variant): wrapped in :class:`ScaledCompressor`;
    * already contractive (``scaled_sign``, ``topk``, ``spherical_rc`` contractive variant, ...) or
      exact (``none``): returned unchanged.

    Raises:
        TypeError: an unbiased compressor without an ``omega(numel)`` method (its scaling is unknown).
    """
    if isinstance(compressor, ScaledCompressor) or not compressor.unbiased:
        return compressor
    if isinstance(compressor, Identity):
        return compressor
    if not isinstance(compressor, HasOmega):
        raise TypeError(f"{compressor!r} is unbiased but defines no omega(numel); cannot scale it for EF")
    return ScaledCompressor(compressor)
