"""Bytes a piece of tensor code reads and writes, counted op by op (what GPU profiles are derived from).

:class:`ByteCounter` is a ``TorchDispatchMode``: every aten op that runs inside it adds the bytes of its
tensor inputs and outputs, with the corrections that make the count a memory-traffic estimate:

* views (an output sharing storage with an input) move nothing;
* allocations (``empty``) move nothing; fills (``zero_``, ``fill_``, ``zeros``) write once;
* ``copy_`` and ``out=`` variants write their destination without reading it;
* indexed ops (``index_select``, ``index_fill_``, ``index_add_``, scatter/gather, ...) touch one
  32-byte memory sector per index of the indexed operand (random access; read, and written back by
  the in-place ones), plus the indices and the values;
* ``topk`` reads its input :data:`TOPK_PASSES` times (radix selection, 8 bits of an fp32 per pass, as
  PyTorch's CUDA kernel does; an assumption, not a measurement).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SECTOR_BYTES", "TOPK_PASSES", "ByteCounter", "count_bytes"]

SECTOR_BYTES = 32
TOPK_PASSES = 4
_WRITE_ONLY = {"zero_", "fill_", "zeros", "zeros_like", "full", "full_like", "ones", "ones_like"}
_ALLOCATIONS = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "arange",
    "randperm",
}
_INDEXED = {
    "index_select",
    "index_fill_",
    "index_fill",
    "index_add_",
    "index_add",
    "index_copy_",
    "index_put_",
    "_index_put_impl_",
    "scatter_",
    "scatter",
    "scatter_add_",
    "scatter_add",
    "gather",
    "take",
}


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return (leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # pragma: no cover - tensors without storage (meta) are not counted
        return -1


class ByteCounter(TorchDispatchMode):
    """Counts memory traffic of every aten op run inside it (module docstring); ``bytes`` holds the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0.0
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        self.bytes += self._traffic(func, args, kwargs, out)
        return out

    def _traffic(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> float:
        name = func.overloadpacket.__name__
        outputs = list(_tensors(out))
        inputs = list(_tensors(args)) + [t for k, v in kwargs.items() if k != "out" for t in _tensors(v)]
        if name in _ALLOCATIONS:
            return 0.0
        if name in _WRITE_ONLY:
            return float(sum(_nbytes(t) for t in outputs))
        in_storages = {_storage(t) for t in inputs}
        if outputs and all(_storage(t) in in_storages for t in outputs) and not name.endswith("_"):
            if "out" not in kwargs and name not in ("copy", "clone"):
                return 0.0  # a view
        if name in _INDEXED:
            index = next((t for t in inputs if t.dtype in (torch.int64, torch.int32)), None)
            if index is None:
                return float(sum(_nbytes(t) for t in inputs + outputs))
            k = index.numel()
            values = [t for t in inputs + outputs if t is not index and t.numel() == k]
            sectors = (2 if name.endswith("_") else 1) * SECTOR_BYTES * k  # read (and write back)
            return float(sectors + _nbytes(index) + sum(_nbytes(t) for t in values))
        if name == "topk":
            return float(TOPK_PASSES * _nbytes(inputs[0]) + sum(_nbytes(t) for t in outputs))
        if name == "copy_":
            return float(_nbytes(args[1]) + _nbytes(args[0]))
        total = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        return float(total)


def count_bytes(run: Callable[[], object]) -> float:
    """Bytes ``run()`` reads and writes (:class:`ByteCounter`)."""
    with ByteCounter() as counter:
        run()
    return counter.bytes
