"""The selection stage of ``leader_support`` compressors (``topk_shared``): one support per step.

ScaleCom's cyclic leader rule (``docs/algorithms.md`` 3.13): at step ``t`` worker ``t mod K`` picks
the support from its own vector and every worker compresses on it, so the values of all workers sum
in the exchange's one all-reduce. Method encoding asks for the support through
:meth:`LeaderSupport.bind`, before the exchange starts, so the collectives of a bucket are issued in
the hook body in order: the support's broadcast, then the values' all-reduce.

* One worker per process (:class:`~lightning_gmc.transport.collectives.TorchCollectives`): the
  leader writes its indices into an int32 buffer, which is broadcast. The broadcast is waited on
  before the values are gathered at those indices: on gloo the host waits for the small broadcast; on
  NCCL ``wait()`` only orders the current CUDA stream after it (no host sync).
* All workers in one process (:class:`~lightning_gmc.transport.collectives.InProcessCollectives`,
  the simulator): the leader's encoding must run first (the simulator orders it so); the other
  workers receive the same indices, which is what the broadcast gives them in a real run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gmc.compressors import CompressionPlan, Compressor
from lightning_gmc.methods import SupportAgreement
from lightning_gmc.transport.collectives import Collectives
from lightning_gmc.transport.exchange import CollectiveFailure
from lightning_gmc.transport.stats import CommStats

__all__ = ["LeaderSupport", "leader_of"]

def leader_of(step: int, world_size: int) -> int:
    """The worker whose vector chooses the support at ``step``: ``step mod K`` (ScaleCom's cyclic rule)."""
    return step % world_size


class LeaderSupport:
    """Agrees on each step's support over a collective back-end, and counts the broadcast.

    Args:
        collectives: the back-end of the exchange the values then travel in.
        stats: where the broadcast's bytes are counted (the exchange's counters).
    """

    def __init__(self, collectives: Collectives, stats: CommStats) -> None:
        self.collectives = collectives
        self.stats = stats
        self._agreed: dict[tuple[int, int, int], Tensor] = {}

    def bind(self, step: int, worker: int, bucket_index: int = 0) -> SupportAgreement:
        """The agreement a :class:`~lightning_gmc.methods.BucketStep` of ``worker`` calls at ``step``."""

        def agree(
            compressor: Compressor, plan: CompressionPlan, x: Tensor, buffer: Tensor, slot: int
        ) -> Tensor:
            return self.agree(compressor, plan, x, buffer, step, worker, (bucket_index, slot))

        return agree

    def agree(
        self,
        compressor: Compressor,
        plan: CompressionPlan,
        x: Tensor,
        buffer: Tensor,
        step: int,
        worker: int,
        key: tuple[int, int],
    ) -> Tensor:
        """The support (flat int64 indices) every worker uses at ``step`` for message ``key``
        (bucket, slot); ``buffer`` is the int32 broadcast buffer of ``worker``."""
        world = self.collectives.world_size
        leader = leader_of(step, world)
        if world == 1:
            return compressor.propose(x, plan)
        if len(self.collectives.local_ranks) == 1:
            if worker == leader:
                buffer.copy_(compressor.propose(x, plan))
            self.stats.record_support(buffer.numel() * buffer.element_size(), world, step)
            future = self.collectives.broadcast([buffer], src=leader)
            try:
                future.wait()
            except Exception as err:
                raise CollectiveFailure(
                    f"lightning_gmc: the support broadcast of bucket {key[0]} (message {key[1]}) at step "
                    f"{step} from leader rank {leader} failed; no update was applied (a peer process "
                    f"probably died or timed out): {err}"
                ) from err
            return buffer.to(torch.int64)
        # In-process: the leader encodes first; the others take its indices.
        if worker == leader:
            self._agreed = {k: v for k, v in self._agreed.items() if k[0] == step}
            buffer.copy_(compressor.propose(x, plan))  # the int32 indices a broadcast would carry
            index = buffer.to(torch.int64)
            self._agreed[(step, *key)] = index
            self.stats.record_support(buffer.numel() * buffer.element_size(), world, step)
            return index
        agreed = self._agreed.get((step, *key))
        if agreed is None:
            raise RuntimeError(
                f"worker {worker} asked for the support of step {step} before its leader (worker {leader}) "
                f"chose it; with all workers in one process the leader must encode first"
            )
        return agreed
