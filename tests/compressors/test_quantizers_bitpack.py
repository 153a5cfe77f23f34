"""The bit packing of the bit-budget compressors against a layout written out bit by bit
(docs/compressors.md)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gmc.compressors.bitpack import pack_bits, pack_trits, unpack_bits, unpack_trits

# ------------------------------------------------------------------------------------------------
# Bit packing
# ------------------------------------------------------------------------------------------------


def reference_stream(codes: list[int], bits: int) -> bytes:
    """LSB-first bit stream, written bit by bit (the layout documented in bitpack.py)."""
    acc, nbits = 0, 0
    for c in codes:
        acc |= c << nbits
        nbits += bits
    return acc.to_bytes((nbits + 7) // 8, "little") if nbits else b""


def reference_pack(codes: list[int], bits: int) -> bytes:
    planes, rest = divmod(bits, 8)
    out = b"".join(bytes((c >> (8 * j)) & 0xFF for c in codes) for j in range(planes))
    return out + reference_stream([c >> (8 * planes) for c in codes], rest)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 20])
@pytest.mark.parametrize("count", [1, 7, 8, 13, 64])
def test_pack_bits_matches_reference_layout(bits: int, count: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * bits / 8)
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_pack_trits_base3() -> None:
    trits = torch.tensor([2, 0, 1, 1, 2, 1, 2], dtype=torch.uint8)
    packed = pack_trits(trits)
    expected = [2 + 0 * 3 + 1 * 9 + 1 * 27 + 2 * 81, 1 + 2 * 3]
    assert packed.tolist() == expected
    assert torch.equal(unpack_trits(packed, 7), trits)
