"""Name -> compressor class registry, and construction from a name or an instance."""

from __future__ import annotations

import inspect
from typing import Any

from lightning_gmc.compressors.base import Compressor

__all__ = ["COMPRESSORS", "build_compressor", "register_compressor"]

COMPRESSORS: dict[str, type[Compressor]] = {}


def register_compressor(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` selectable by ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in COMPRESSORS and COMPRESSORS[cls.name] is not cls:
        raise ValueError(f"compressor name {cls.name!r} is already taken by {COMPRESSORS[cls.name].__name__}")
    COMPRESSORS[cls.name] = cls
    return cls


def build_compressor(spec: str | Compressor, density: float | None = None, **options: Any) -> Compressor:
    """Return ``spec`` if it is a compressor, else instantiate the registered class of that name.

    ``density`` is passed to compressors that take one; other keyword options must be accepted by the
    compressor's constructor.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an option the compressor does
            not take.
    """
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"compressor must be a name or a Compressor instance, got {type(spec).__name__}")
    cls = COMPRESSORS.get(spec.lower())
    if cls is None:
        raise ValueError(f"unknown compressor {spec!r}; valid names: {', '.join(sorted(COMPRESSORS))}")
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = dict(options)
    if density is not None and "density" in accepted:
        kwargs["density"] = density
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        valid = [p for p in accepted if p != "self"]
        raise ValueError(
            f"compressor {spec!r} does not take option(s) {unknown}; it accepts: {valid or 'no options'}"
        )
    return cls(**kwargs)
