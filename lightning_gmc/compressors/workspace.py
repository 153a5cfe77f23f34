"""Named scratch tensors with an explicit owner, allocated once and reused every step.

Three kinds of owner hold one :class:`Workspace` each, and nothing else allocates step buffers:

* a :class:`~lightning_gmc.compressors.base.CompressionPlan` (``plan.workspace``): scratch a
  compressor uses *within one call* (magnitudes, uniforms, decode buffers) and constants derived from
  the plan (index templates). Nothing in it outlives the call that filled it, so two messages may
  share a plan;
* a message slot of a bucket, passed to :meth:`Compressor.compress` as ``workspace``: the tensors of
  the returned :class:`~lightning_gmc.compressors.base.Payload` (the identity's dense values). They
  live until the exchange of that message has finished, so every message in flight at once has its
  own slot;
* a bucket's method state (``BucketState.workspace``): method and transport scratch.

Buffers are keyed by name and device and reallocated only when the requested size or dtype changes,
so after the first step a training step allocates no gradient-sized memory here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import torch
from torch import Tensor

__all__ = ["Workspace"]

T = TypeVar("T")


class Workspace:
    """Buffers and derived constants owned by one object (a plan, a message slot, a bucket)."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[str, torch.device], Tensor] = {}
        self._constants: dict[tuple[str, torch.device], object] = {}

    def tensor(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised 1-D buffer ``name`` of ``numel`` elements, allocated on first use (or when
        the size or dtype changes) and returned as is afterwards."""
        key = (name, torch.device(device))
        buf = self._tensors.get(key)
        if buf is None or buf.numel() != numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._tensors[key] = buf
        return buf

    def constant(self, name: str, device: torch.device, build: Callable[[], T]) -> T:
        """``build()`` on first use per (name, device), the stored result afterwards (index templates,
        zero-padded matrices, ...). The caller must always build the same kind of object for a name."""
        key = (name, torch.device(device))
        if key not in self._constants:
            self._constants[key] = build()
        return cast(T, self._constants[key])

    @property
    def nbytes(self) -> int:
        """Bytes held by the named buffers (constants not included)."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def __len__(self) -> int:
        return len(self._tensors) + len(self._constants)

    def __repr__(self) -> str:
        names = sorted({name for name, _ in self._tensors} | {name for name, _ in self._constants})
        return f"Workspace({', '.join(names)})"
