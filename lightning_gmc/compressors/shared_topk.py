"""``topk_shared``: top-k on a support every rank shares, so values travel in one all-reduce.

ScaleCom's cyclic local top-k (Chen et al., "ScaleCom: Scalable Sparsified Gradient Compression for
Communication-Efficient Distributed Training", NeurIPS 2020; ``docs/algorithms.md`` 3.13): at step
``t`` the *leader* rank ``t mod K`` picks each parameter's top-``k`` indices from its own
residual-corrected vector ``u`` (:meth:`TopKShared.propose`) and broadcasts them (``k`` int32 per
segment); every rank then sends its own values at those indices (:meth:`TopKShared.compress_on`),
one all-reduce sums them, and error feedback keeps the rest: ``e = u - C(u)`` with ``C(u) = u`` on
the shared support. The broadcast is the caller's (the transport's support agreement); this class
stays a pure tensor map.

Bytes per rank per step do not grow with K: ``k`` int32 broadcast plus a ring all-reduce of ``k``
values, about ``3 (K-1)/K * 4k`` bytes in fp32, against ``(K-1) * 8k`` for the all-gather of
``topk``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lightning_gmc.compressors.base import CompressionPlan, Payload, RandomStreams
from lightning_gmc.compressors.sparse import SparsePlan, TopK
from lightning_gmc.compressors.workspace import Workspace

__all__ = ["TopKShared"]


@dataclass(frozen=True)
class TopKShared(TopK):
    """Exact per-parameter top-k of the step's leader rank, applied by every rank (all-reduce route).

    Used alone (:meth:`compress`, e.g. by the compressor benchmarks or with one worker) it is exact
    top-k of ``x``. Under the DDP hook and the simulator every rank compresses on the leader's
    support: the transport calls :meth:`propose` on the leader, broadcasts the indices and calls
    :meth:`compress_on` on every rank.

    Args:
        density: fraction kept per parameter.
        wire_dtype: dtype the values travel in (:mod:`lightning_gmc.compressors.wire`).
    """

    name: ClassVar[str] = "topk_shared"
    shared_support: ClassVar[bool] = True
    leader_support: ClassVar[bool] = True

    def propose(self, x: Tensor, plan: CompressionPlan) -> Tensor:
        """The leader's support for ``x``: flat int64 indices, ``plan.total`` of them, per segment in
        order (exact top-k by magnitude of each segment)."""
        assert isinstance(plan, SparsePlan)
        return self.select(x, plan, RandomStreams(0, 0), 0)

    def compress_on(
        self, x: Tensor, plan: CompressionPlan, index: Tensor, workspace: Workspace | None = None
    ) -> Payload:
        """This rank's payload on the agreed support ``index`` (int64, from :meth:`propose`)."""
        return self._payload_at(x, index)

    def compress(
        self,
        x: Tensor,
        plan: CompressionPlan,
        rng: RandomStreams,
        step: int,
        workspace: Workspace | None = None,
    ) -> Payload:
        # Alone, every "rank" is its own leader.
        return self.compress_on(x, plan, self.propose(x, plan), workspace)

    def support_numel(self, plan: CompressionPlan) -> int:
        """Indices in the broadcast support: ``plan.total`` (sent as int32)."""
        assert isinstance(plan, SparsePlan)
        return plan.total
