"""Name -> method class registry and construction."""

from __future__ import annotations

import inspect
from typing import Any

from lightning_gmc.compressors import Compressor, scale_for_error_feedback
from lightning_gmc.methods.base import Method

__all__ = ["METHODS", "build_method", "register_method"]

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``method=cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already taken by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


def method_option_names(name: str) -> list[str]:
    """Constructor options of a registered method (besides the compressor)."""
    cls = METHODS[name]
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "compressor")]


def build_method(name: str, compressor: Compressor, ef_scaling: bool | None = None, **options: Any) -> Method:
    """Instantiate the registered method ``name``.

    Args:
        name: registered method name.
        compressor: the method's (per-step) compressor.
        ef_scaling: scale an unbiased compressor ``C`` to ``C / (1 + omega)`` (spec
            ``compressors.md`` §2.3), which makes it contractive, the property error-feedback
            convergence proofs assume. None (default) turns it on exactly for methods with error
            feedback. Contractive compressors (top-k, RBGS, scaled sign) are never rescaled.
        options: the method's own options.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an option it does not take.
    """
    cls = METHODS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    accepted = method_option_names(cls.name)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise ValueError(
            f"method {name!r} does not take option(s) {unknown}; it accepts: {accepted or 'none'}"
        )
    use_scaling = cls.error_feedback if ef_scaling is None else ef_scaling
    if use_scaling:
        compressor = scale_for_error_feedback(compressor)
    return cls(compressor, **options)
