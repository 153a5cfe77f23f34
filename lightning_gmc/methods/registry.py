"""Name -> method class registry and construction."""

from __future__ import annotations

import math
from typing import Any

from lightning_gmc._arguments import check_bool
from lightning_gmc._registry import Registry
from lightning_gmc.compressors import Compressor, scale_for_error_feedback
from lightning_gmc.methods.base import Method

__all__ = ["METHODS", "build_method", "method_option_names", "register_method"]

_REGISTRY: Registry[Method] = Registry("method", "valid methods")
METHODS: dict[str, type[Method]] = _REGISTRY.classes
register_method = _REGISTRY.register


def method_option_names(name: str) -> list[str]:
    """Constructor options of a registered method (besides the compressor)."""
    return _REGISTRY.option_names(name, skip=("compressor",))


def build_method(name: str, compressor: Compressor, ef_scaling: bool | None = None, **options: Any) -> Method:
    """Instantiate the registered method ``name``.

    Args:
        name: registered method name.
        compressor: the method's (per-step) compressor.
        ef_scaling: scale an unbiased compressor ``C`` to ``C / (1 + omega)``
            (``docs/algorithms.md`` 3.5), which makes it contractive, the property error-feedback
            convergence proofs assume (GMC paper §3.3, Assumption 1). None (default) turns it on
            exactly for methods with error feedback. Contractive compressors (top-k, RBGS, scaled
            sign) are never rescaled.
        options: the method's own options.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an option it does not take.
    """
    cls = _REGISTRY.get(name)
    _REGISTRY.check_options(cls.name, options, skip=("compressor",))
    for key, value in options.items():
        # nan passes every `x < 0` check and would silently turn each step into a non-finite skip.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"method {cls.name!r}: option {key}={value} must be a finite number")
    ef_scaling = check_bool("ef_scaling", ef_scaling, optional=True)
    use_scaling = cls.error_feedback if ef_scaling is None else ef_scaling
    if use_scaling:
        compressor = scale_for_error_feedback(compressor)
    return cls(compressor, **options)
