"""Name -> compressor class registry, and construction from a name or an instance."""

from __future__ import annotations

from typing import Any

from lightning_gmc._registry import Registry
from lightning_gmc.compressors.base import Compressor

__all__ = ["COMPRESSORS", "build_compressor", "register_compressor"]

_REGISTRY: Registry[Compressor] = Registry("compressor", "valid names")
COMPRESSORS: dict[str, type[Compressor]] = _REGISTRY.classes
register_compressor = _REGISTRY.register


def build_compressor(spec: str | Compressor, density: float | None = None, **options: Any) -> Compressor:
    """Return ``spec`` if it is a compressor, else instantiate the registered class of that name.

    ``density`` is passed to compressors that take one; other keyword options must be accepted by the
    compressor's constructor. The result is an immutable value: equal names and options give equal,
    hashable compressors; derive a variant with ``dataclasses.replace``.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an option the compressor does
            not take.
    """
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"compressor must be a name or a Compressor instance, got {type(spec).__name__}")
    cls = _REGISTRY.get(spec)
    kwargs = dict(options)
    if density is not None and "density" in _REGISTRY.option_names(cls.name):
        kwargs["density"] = density
    _REGISTRY.check_options(cls.name, kwargs)
    return cls(**kwargs)
