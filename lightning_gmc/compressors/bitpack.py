"""Vectorised packing of fixed-width integer codes into ``uint8`` wire buffers.

Every quantizer in this package turns a vector into integer codes of a fixed width ``b`` and sends
them as real bits: ``count`` codes of ``b`` bits occupy exactly ``ceil(count * b / 8)`` bytes
(:func:`packed_nbytes`), so the only padding is the last partial byte of a section.

Layout (documented because it *is* the wire format):

* ``b <= 8``: a little-endian bit stream. Code ``t`` occupies stream bits ``[t*b, (t+1)*b)``, least
  significant bit first; byte ``i`` holds stream bits ``[8i, 8i+8)``, least significant first.
* ``b > 8``: write ``b = 8q + r``. The low ``8q`` bits of every code go first as ``q`` byte planes
  (plane ``j`` is byte ``j`` of every code, ``count`` bytes each), then the high ``r`` bits follow as
  an ``r``-bit stream as above. The size is still ``q*count + ceil(count*r/8) = ceil(count*b/8)``.
  Byte planes need no shifting at all, which makes 9-bit natural compression (sign + exponent) cost
  one byte copy plus a 1-bit stream.

Packing works on groups of 8 codes (``8*r`` bits = ``r`` whole bytes), so there is no Python loop
over elements: eight column operations per group word, whatever the vector size.

Ternary codes (TernGrad) use :func:`pack_trits`: five trits per byte in base 3 (``3^5 = 243 <= 256``),
1.6 bits per coordinate against the entropy bound ``log2(3) = 1.585``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits", "pack_trits", "packed_nbytes", "trit_nbytes", "unpack_bits", "unpack_trits"]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy: ``ceil(count * bits / 8)``."""
    if bits < 0 or count < 0:
        raise ValueError(f"count and bits must be non-negative, got {count}, {bits}")
    return (count * bits + 7) // 8


def trit_nbytes(count: int) -> int:
    """Bytes that ``count`` ternary codes occupy with five trits per byte: ``ceil(count / 5)``."""
    return (count + 4) // 5


def _word_dtype(bits: int) -> torch.dtype:
    # A group of 8 codes is 8*bits bits; keep it clear of the sign bit of the word type.
    if bits == 1:
        return torch.uint8
    if bits <= 3:
        return torch.int32
    return torch.int64


def _pack_small(codes: Tensor, bits: int, out: Tensor) -> None:
    """Pack ``codes`` (integer tensor, values < 2**bits, bits in 1..8) into ``out`` (uint8)."""
    count = codes.numel()
    nbytes = out.numel()
    groups = (count + 7) // 8
    wtype = _word_dtype(bits)
    if count % 8:
        padded = torch.zeros(groups * 8, dtype=wtype, device=codes.device)
        padded[:count] = codes
        grid = padded.view(groups, 8)
    else:
        grid = codes.to(wtype).view(groups, 8)
    word = grid[:, 0].clone()
    for j in range(1, 8):
        word.bitwise_or_(grid[:, j].bitwise_left_shift(bits * j))
    if bits == 1:
        out.copy_(word[:nbytes])
        return
    full = torch.empty(groups, bits, dtype=torch.uint8, device=codes.device)
    for i in range(bits):
        full[:, i] = word.bitwise_right_shift(8 * i).bitwise_and_(0xFF)
    out.copy_(full.view(-1)[:nbytes])


def _unpack_small(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`_pack_small`; returns int64 codes."""
    groups = (count + 7) // 8
    wtype = _word_dtype(bits)
    if packed.numel() < groups * bits:
        full = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
        full[: packed.numel()] = packed
    else:
        full = packed[: groups * bits]
    grid = full.view(groups, bits).to(wtype)
    word = grid[:, 0].clone()
    for i in range(1, bits):
        word.bitwise_or_(grid[:, i].bitwise_left_shift(8 * i))
    mask = (1 << bits) - 1
    codes = torch.empty(groups, 8, dtype=torch.int64, device=packed.device)
    for j in range(8):
        codes[:, j] = word.bitwise_right_shift(bits * j).bitwise_and_(mask)
    return codes.view(-1)[:count]


def pack_bits(codes: Tensor, bits: int, out: Tensor | None = None) -> Tensor:
    """Pack non-negative integer ``codes`` of width ``bits`` (0..32) into a ``uint8`` tensor.

    Args:
        codes: 1-D integer tensor; every value must be ``< 2**bits`` (not checked, for speed; higher
            bits would corrupt neighbouring codes).
        bits: code width. ``0`` gives an empty buffer.
        out: optional preallocated ``uint8`` buffer of exactly ``packed_nbytes(codes.numel(), bits)``.

    Returns:
        The packed bytes (``out`` when given).
    """
    count = codes.numel()
    nbytes = packed_nbytes(count, bits)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=codes.device)
    elif out.numel() != nbytes or out.dtype != torch.uint8:
        raise ValueError(f"out must be uint8 with {nbytes} elements, got {out.dtype} x {out.numel()}")
    if bits == 0 or count == 0:
        return out
    if bits > 32:
        raise ValueError(f"codes wider than 32 bits are not supported, got {bits}")
    planes, rest = divmod(bits, 8)
    if planes == 0:
        _pack_small(codes, bits, out)
        return out
    wide = codes.to(torch.int64)
    for j in range(planes):
        out[j * count : (j + 1) * count] = wide.bitwise_right_shift(8 * j).bitwise_and_(0xFF)
    if rest:
        _pack_small(wide.bitwise_right_shift(8 * planes), rest, out[planes * count :])
    return out


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of width ``bits`` as int64."""
    if packed.numel() < packed_nbytes(count, bits):
        raise ValueError(f"buffer of {packed.numel()} bytes is too small for {count} x {bits} bits")
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64, device=packed.device)
    planes, rest = divmod(bits, 8)
    if planes == 0:
        return _unpack_small(packed, bits, count)
    codes = packed[:count].to(torch.int64)
    for j in range(1, planes):
        codes.bitwise_or_(packed[j * count : (j + 1) * count].to(torch.int64).bitwise_left_shift(8 * j))
    if rest:
        high = _unpack_small(packed[planes * count :], rest, count)
        codes.bitwise_or_(high.bitwise_left_shift(8 * planes))
    return codes


_TRIT_WEIGHTS = (1, 3, 9, 27, 81)


def pack_trits(trits: Tensor, out: Tensor | None = None) -> Tensor:
    """Pack values in ``{0, 1, 2}`` five per byte: ``byte = sum_j trit[5g+j] * 3^j``."""
    count = trits.numel()
    nbytes = trit_nbytes(count)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=trits.device)
    if count == 0:
        return out
    padded = torch.zeros(nbytes * 5, dtype=torch.uint8, device=trits.device)
    padded[:count] = trits
    grid = padded.view(nbytes, 5)
    # uint8 arithmetic cannot overflow: the largest value is 2 * (1+3+9+27+81) = 242.
    acc = grid[:, 0].clone()
    for j in range(1, 5):
        acc.add_(grid[:, j] * _TRIT_WEIGHTS[j])
    out.copy_(acc)
    return out


def unpack_trits(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_trits`: the first ``count`` trits as uint8."""
    nbytes = trit_nbytes(count)
    value = packed[:nbytes].to(torch.int16)
    grid = torch.empty(nbytes, 5, dtype=torch.uint8, device=packed.device)
    for j in range(5):
        grid[:, j] = torch.remainder(torch.div(value, _TRIT_WEIGHTS[j], rounding_mode="floor"), 3)
    return grid.view(-1)[:count]
