"""Under ``hierarchy="node"`` the exchange runs in an inter-node group, whose rank numbers are node
numbers: an error there named "rank 1" for what is global rank 3. The hook state labels its exchange
with the global rank and the place in the hierarchy, and the exchange's errors use that label."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from lightning_gmc import GMCConfig, GMCHookState
from lightning_gmc.hook.hierarchy import NodeGroups, NodeTopology
from lightning_gmc.methods import BucketState, Message, ParameterTable, WorkerState
from lightning_gmc.transport import CommStats, Exchange


class _FailingPair:
    """Two workers, this process being the one of group rank ``rank``; every collective fails."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    @property
    def world_size(self) -> int:
        return 2

    @property
    def local_ranks(self) -> Sequence[int]:
        return (self.rank,)

    def _failed(self) -> Future[Tensor]:
        future: Future[Tensor] = Future()
        future.set_exception(RuntimeError("peer gone"))
        return future

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> Future[Tensor]:
        return self._failed()

    def all_gather_bytes(self, inputs: Sequence[Tensor], output: Tensor) -> Future[Tensor]:
        return self._failed()

    def broadcast(self, tensors: Sequence[Tensor], src: int) -> Future[Tensor]:
        return self._failed()


def _failure_message(exchange: Exchange) -> str:
    """The error of one all-reduced message (the identity's) whose collective fails."""
    method = GMCConfig(compressor="none").build()
    table = ParameterTable(("w",), (torch.Size((8,)),), (0,))
    bucket: BucketState = WorkerState(method, table, torch.device("cpu"), 0, 0).bucket((0,))
    plan = bucket.plan(method.compressor)
    sent = [[Message(method.compressor, plan, method.compressor.wrap_input(torch.ones(8), plan))]]
    with pytest.raises(RuntimeError, match="CollectiveFailure") as caught:  # through the future
        exchange.start(sent, [bucket], step=5, bucket_index=1).wait()
    return str(caught.value)


def test_the_exchange_names_its_rank_label_in_failures() -> None:
    assert "at step 5 on global rank 3 (x) failed" in _failure_message(
        Exchange(_FailingPair(1), CommStats(), "global rank 3 (x)")
    )
    assert "at step 5 on rank 1 failed" in _failure_message(Exchange(_FailingPair(1), CommStats()))


@pytest.mark.usefixtures("single_rank_group")
def test_under_hierarchy_node_errors_name_the_global_rank_and_the_group_rank() -> None:
    state = GMCHookState.from_config(GMCConfig(hierarchy="node", compressor="none"))
    world = dist.group.WORLD
    assert isinstance(world, dist.ProcessGroup)
    # global rank 3 of 2 nodes x 2 ranks: node 1, local rank 1, rank 1 of its inter-node group
    state.set_node_groups(NodeGroups(NodeTopology(2, 2, node_rank=1, local_rank=1), intra=world, inter=world))
    state.exchange.collectives = _FailingPair(1)  # the inter-node group's numbering: this rank is 1
    message = _failure_message(state.exchange)
    assert "on global rank 3 (node 1, local rank 1; rank 1 of the inter-node group) failed" in message, (
        message
    )
