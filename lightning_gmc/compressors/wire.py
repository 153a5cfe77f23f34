"""The dtype float values travel in: ``wire_dtype`` of the value-sending compressors.

``"fp32"`` (default) sends values as computed. ``"bf16"`` and ``"fp16"`` round each sent value to
16 bits *inside* the compressor, so ``C(x)`` is the rounded vector: error-feedback methods keep the
rounding error in their residual ``x - C(x)`` (``docs/algorithms.md`` 3.12), and decoding adds the
16-bit values into fp32 buffers. Where 16-bit values are summed over workers (a shared support's
values, the dense fallback), the transport adds them in fp32 in rank order and rounds each sum once;
the worker that rounded an element hands the remainder to its method, which keeps it (the residual
for error feedback, the estimate for EF21), so the aggregate's rounding is not lost either.

fp16 covers only ``|v| <= 65504``: a value or a sum beyond it becomes infinite, and the transport then
raises :class:`~lightning_gmc.transport.WireOverflow` (a :class:`FloatingPointError`) on every rank
and the hook refuses the step, every state as before it (``docs/algorithms.md`` 3.12). bf16 has
fp32's range and is the recommended 16-bit choice.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["WIRE_DTYPES", "WireDtype", "check_wire_dtype", "wire_torch_dtype"]

WireDtype = Literal["fp32", "bf16", "fp16"]

#: Valid ``wire_dtype`` names and the torch dtype values travel in.
WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_wire_dtype(wire_dtype: object) -> WireDtype:
    """``wire_dtype`` if it is one of ``"fp32"``, ``"bf16"``, ``"fp16"``, else a ValueError naming them."""
    if not isinstance(wire_dtype, str) or wire_dtype not in WIRE_DTYPES:
        valid = ", ".join(repr(name) for name in WIRE_DTYPES)
        raise ValueError(f"wire_dtype must be one of {valid}, got {wire_dtype!r}")
    return wire_dtype  # type: ignore[return-value]


def wire_torch_dtype(wire_dtype: str) -> torch.dtype:
    """The torch dtype of a checked ``wire_dtype`` name."""
    return WIRE_DTYPES[check_wire_dtype(wire_dtype)]
