"""Test isolation shared by every test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    # An in-process Trainer (devices=1) writes LOCAL_RANK, NODE_RANK, MASTER_ADDR and MASTER_PORT into
    # os.environ. Left there, they reach later multi-process runs, whose Lightning then believes its
    # ranks were started by an external launcher and never starts rank 1: that run hangs.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
