"""Test isolation shared by every test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    # An in-process Trainer (devices=1) writes LOCAL_RANK, NODE_RANK, MASTER_ADDR and MASTER_PORT into
    # os.environ. Left there, they reach later multi-process runs, whose Lightning then believes its
    # ranks were started by an external launcher and never starts rank 1: that run hangs.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_process_group_left_behind() -> Iterator[None]:
    # An in-process Trainer or Fabric (devices=1) leaves its one-rank default group initialised. Torn
    # down here, no test inherits it; under mutation testing, whose workers fork after the test run
    # that maps tests to functions, an inherited gloo group has no threads and would hang.
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def single_rank_group() -> Iterator[None]:
    """A fresh world-size-1 gloo group for plain-DDP tests, torn down so later in-process Trainers
    start clean. A group left by an earlier in-process Trainer is replaced (after a fork, as under
    mutation testing, an inherited gloo group has no threads and would hang)."""
    torch.set_num_threads(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
