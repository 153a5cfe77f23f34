"""One rank of the gloo check of ``TorchCollectives``
(``tests/distributed/test_collectives_order_distributed.py``).

``python collectives_script.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE`` (3), ``MASTER_ADDR`` and
``MASTER_PORT`` set (``launch.launch_ranks``): ``reduce_scatter_sum`` then ``all_gather`` of
:func:`inputs` in fp32, bf16 and fp16; writes ``rank{RANK}.pt`` with the gathered sums by dtype.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_gmc.transport import TorchCollectives

WORLD, CHUNK = 3, 4


def inputs(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    # Per element, one worker sends a large value, one its negative and one a small value: the sum
    # depends on the order of addition ((big + small) - big = 0 in fp32, big + (small - big) = small).
    # All three are exact in fp16 and bf16 too, and big + small needs 29 bits (fp32 has 24).
    big, small = 2.0**15, 2.0**-14
    values = [big, small, -big]
    out = []
    for rank in range(WORLD):
        row = [values[(rank + i) % WORLD] * (1 - 0.5 * (i % 2)) for i in range(WORLD * CHUNK)]
        out.append(torch.tensor(row, dtype=torch.float32).to(dtype))
    return out


def main() -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    try:
        backend = TorchCollectives()
        results = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            send = inputs(dtype)[rank]
            out = torch.empty(CHUNK)
            backend.reduce_scatter_sum([send], [out]).wait()
            gathered = torch.empty(WORLD * CHUNK)
            backend.all_gather([out], gathered).wait()
            results[str(dtype)] = gathered
        torch.save(results, Path(sys.argv[1]) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
