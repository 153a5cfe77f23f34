"""The model the planner predicts for: per-tensor element counts, from whatever the user has.

* a parameter count (``--params 1.3e9``): split into tensors of at most :data:`CHUNK` elements (the
  bytes do not depend on the split; per-tensor selection and DDP's buckets do, a little);
* per-tensor sizes or shapes (``--tensor-sizes 4096x4096 4096 ...``);
* a preset (``--model gpt-125m``): the tensors of a published architecture (:data:`PRESETS`);
* an import path (``--model pkg.module:Class``): a LightningModule or ``nn.Module`` built on the meta
  device (nothing allocated), its trainable parameters;
* a checkpoint (``--checkpoint file.ckpt``): the floating-point tensors of its state dict (Lightning's
  ``state_dict`` key or a plain one), read memory-mapped, without the BatchNorm running statistics.

:func:`measure_compute` times forward, backward and an SGD step of a module on this machine.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHUNK",
    "PRESETS",
    "ModelShape",
    "from_checkpoint",
    "from_import_path",
    "measure_compute",
    "module_factory",
    "parse_kwargs",
    "parse_sizes",
]

CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelShape:
    """A model's trainable tensors (element counts, in parameter order) and where they came from."""

    name: str
    numels: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @classmethod
    def from_count(cls, count: float) -> ModelShape:
        total = int(count)
        if total < 1:
            raise ValueError(f"a model needs at least one parameter, got {count}")
        chunks = [CHUNK] * (total // CHUNK) + ([total % CHUNK] if total % CHUNK else [])
        return cls(f"{total:.3g} parameters", tuple(chunks))


def _transformer(layers: int, width: int, ffn: int, vocab: int, context: int, gated: bool) -> tuple[int, ...]:
    """Tensors of a decoder-only transformer: embeddings, per layer attention (q, k, v, out), the MLP
    (gated: three matrices, else two with biases) and norms, a final norm (tied output embedding)."""
    tensors = [vocab * width] + ([] if gated else [context * width])
    for _ in range(layers):
        tensors += [width, width] if not gated else [width]
        tensors += [width * width] * 4 + ([] if gated else [width] * 4)
        tensors += [width] if gated else [width, width]
        if gated:
            tensors += [width * ffn] * 3
        else:
            tensors += [width * ffn, ffn, ffn * width, width]
    tensors += [width] if gated else [width, width]
    return tuple(tensors)


#: name -> (description, tensors): GPT-3 Small and XL (Brown et al. 2020, Table 2.1: 12 x 768 and
#: 24 x 2048, context 2048, GPT-2 vocabulary) and LLaMA-7B (Touvron et al. 2023: 32 x 4096, SwiGLU
#: 11008, vocabulary 32000, output matrix untied)
PRESETS: dict[str, tuple[str, Callable[[], tuple[int, ...]]]] = {
    "gpt-125m": ("GPT-3 Small (125M)", lambda: _transformer(12, 768, 3072, 50257, 2048, False)),
    "gpt-1.3b": ("GPT-3 XL (1.3B)", lambda: _transformer(24, 2048, 8192, 50257, 2048, False)),
    "llama-7b": ("LLaMA-7B", lambda: (*_transformer(32, 4096, 11008, 32000, 0, True), 32000 * 4096)),
}


def parse_sizes(items: Sequence[str]) -> ModelShape:
    """``["4096x4096", "4096", "1e6"]`` -> one tensor per item (shapes are multiplied out)."""
    numels = []
    for item in items:
        dims = [float(d) for d in item.lower().split("x")]
        numel = int(math.prod(dims))
        if numel < 1 or any(d != int(d) for d in dims):
            raise ValueError(f"tensor size {item!r}: give positive whole numbers, e.g. 4096x1024")
        numels.append(numel)
    return ModelShape(f"{len(numels)} tensors", tuple(numels))


def _trainable_numels(module: nn.Module) -> tuple[int, ...]:
    return tuple(p.numel() for p in module.parameters() if p.requires_grad)


def module_factory(path: str, kwargs: Mapping[str, Any] | None = None) -> Callable[[], nn.Module]:
    """A function building ``pkg.module:Class(**kwargs)``.

    Raises:
        ValueError: ``path`` is not of the form ``module:attribute``.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"--model {path!r}: give a preset ({', '.join(PRESETS)}) or an import path pkg.module:Class"
        )
    cls = getattr(importlib.import_module(module_name), attribute)
    options = dict(kwargs or {})

    def build() -> nn.Module:
        module = cls(**options)
        if not isinstance(module, nn.Module):
            raise ValueError(f"{path} built a {type(module).__name__}, not a torch.nn.Module")
        return module

    return build


def from_import_path(path: str, kwargs: Mapping[str, Any] | None = None) -> tuple[ModelShape, nn.Module]:
    """Build ``pkg.module:Class`` (a LightningModule or ``nn.Module``) with ``kwargs`` on the meta
    device (no memory allocated) and read its trainable parameters.

    Raises:
        ValueError: not of the form ``module:attribute``, or the object is not an ``nn.Module``.
    """
    factory = module_factory(path, kwargs)
    with torch.device("meta"):
        module = factory()
    return ModelShape(path, _trainable_numels(module)), module


def from_checkpoint(path: str | Path) -> ModelShape:
    """The floating-point tensors of a checkpoint's state dict (see the module docstring)."""
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no state dict in it (expected a dict, or a Lightning checkpoint)")
    numels = tuple(
        t.numel()
        for name, t in state.items()
        if isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and not name.endswith(("running_mean", "running_var"))
    )
    if not numels:
        raise ValueError(f"{path}: its state dict holds no floating-point tensors")
    return ModelShape(Path(path).name, numels)


def measure_compute(
    factory: Callable[[], nn.Module], example: torch.Tensor, steps: int = 5, warmup: int = 2
) -> float:
    """Median seconds of forward, backward (of the outputs' sum) and ``SGD(momentum)``'s step of the
    module built by ``factory`` on ``example``, on this machine's CPU."""
    module = factory()
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        out = module(example)
        (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-args '{"hidden": 64}'`` -> a dict."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"--model-args must be a JSON object, got {text!r}")
    return value
