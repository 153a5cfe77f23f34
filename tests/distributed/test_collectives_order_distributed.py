"""``TorchCollectives`` on 3 gloo processes: ``reduce_scatter_sum`` and ``all_gather`` give the bits of
the in-process back-end, whose rank-order fp32 sum ``tests/transport/test_collectives_order.py`` checks
against numpy additions written out by hand. The inputs' sums depend on the order of addition, so a
back-end that reorders or rounds fails.
"""

from __future__ import annotations

from pathlib import Path

import torch
from collectives_script import CHUNK, WORLD
from collectives_script import inputs as _inputs
from launch import TESTS, launch_ranks

from lightning_gmc.transport import InProcessCollectives


def test_gloo_reduce_scatter_equals_the_in_process_back_end_bitwise(tmp_path: Path) -> None:
    # gloo's own reduce_scatter and all_reduce add in ring order, which differs from rank order for
    # K >= 3 on these values; the back-end's all-to-all plus local sum must not.
    launch_ranks([TESTS / "collectives_script.py", tmp_path], WORLD, timeout=180)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        inputs = _inputs(dtype)
        outputs = [torch.empty(CHUNK) for _ in range(WORLD)]
        InProcessCollectives(WORLD).reduce_scatter_sum(inputs, outputs).wait()
        expected = torch.cat(outputs)
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}.pt")[str(dtype)]
            assert torch.equal(got, expected), (dtype, rank)
