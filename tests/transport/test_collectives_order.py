"""``reduce_scatter_sum`` and ``all_gather`` of the in-process collective back-end (gloo's, on 3
processes: ``tests/distributed/test_collectives_order_distributed.py``).

The reference is written out by hand: numpy float32 additions in rank order. Values are chosen so that
any other order of addition, or 16-bit accumulation, gives other bits, so the tests fail if either
back-end reorders or rounds.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from collectives_script import CHUNK, WORLD
from collectives_script import inputs as _inputs

from lightning_gmc.transport import InProcessCollectives


def _rank_order_by_hand(inputs: list[torch.Tensor]) -> list[np.ndarray]:
    received = [np.asarray(x.float().numpy(), dtype=np.float32) for x in inputs]
    sums = []
    for rank in range(WORLD):
        total = received[0][rank * CHUNK : (rank + 1) * CHUNK].copy()
        for worker in range(1, WORLD):
            total = np.float32(total + received[worker][rank * CHUNK : (rank + 1) * CHUNK])
        sums.append(total)
    return sums


def test_in_process_reduce_scatter_adds_in_rank_order_in_fp32() -> None:
    inputs = _inputs()
    outputs = [torch.empty(CHUNK) for _ in range(WORLD)]
    InProcessCollectives(WORLD).reduce_scatter_sum(inputs, outputs).wait()
    expected = _rank_order_by_hand(inputs)
    for out, want in zip(outputs, expected, strict=True):
        assert out.numpy().tobytes() == want.tobytes()
    # The values make the order visible: the reverse order gives other bits.
    reverse = _rank_order_by_hand(inputs[::-1])
    assert any(a.tobytes() != b.tobytes() for a, b in zip(expected, reverse, strict=True))


def test_in_process_reduce_scatter_accumulates_16_bit_inputs_in_fp32() -> None:
    # bf16 has 8 significant bits: 256 + 1 + 1 rounds to 256 in bf16 at every step, 258 in fp32.
    inputs = [torch.full((WORLD * CHUNK,), v, dtype=torch.bfloat16) for v in (256.0, 1.0, 1.0)]
    outputs = [torch.empty(CHUNK) for _ in range(WORLD)]
    InProcessCollectives(WORLD).reduce_scatter_sum(inputs, outputs).wait()
    assert all(out.tolist() == [258.0] * CHUNK for out in outputs)
    in_bf16 = (inputs[0][:1] + inputs[1][:1]) + inputs[2][:1]
    assert in_bf16.item() == 256.0  # what a 16-bit ring would have produced


def test_reduce_scatter_refuses_a_16_bit_output() -> None:
    inputs = [torch.zeros(WORLD * CHUNK) for _ in range(WORLD)]
    outputs = [torch.empty(CHUNK, dtype=torch.bfloat16) for _ in range(WORLD)]
    with pytest.raises(TypeError, match="fp32"):
        InProcessCollectives(WORLD).reduce_scatter_sum(inputs, outputs)


def test_in_process_all_gather_concatenates_in_rank_order() -> None:
    inputs = [torch.full((CHUNK,), float(rank), dtype=torch.bfloat16) for rank in range(WORLD)]
    output = torch.empty(WORLD * CHUNK, dtype=torch.bfloat16)
    InProcessCollectives(WORLD).all_gather(inputs, output).wait()
    assert output.tolist() == [float(rank) for rank in range(WORLD) for _ in range(CHUNK)]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
