"""Type checks of user-facing arguments, one helper per type (shared by every layer).

Python's conversions are too forgiving for configuration: ``bool("no")`` is True, ``int(1.7)`` is 1,
and a string reaches a comparison deep inside a compressor before anything names it. Every option a
user sets (strategy and :class:`~lightning_gmc.GMCConfig` fields, compressor and method options) goes
through these helpers, which accept the values LightningCLI passes from YAML (real bools, ints, floats,
strings) and refuse anything else with a message that names the argument, what it got and what is
valid:

* :func:`check_bool`: only ``True`` / ``False`` (``"no"``, ``0``, ``1`` are refused);
* :func:`check_int`: an integer, or a float without a fractional part (``2.0``); never a bool;
* :func:`check_float`: a finite real number (ints too); never a bool;
* :func:`check_mapping`: a mapping with string keys.

A wrong type raises :class:`TypeError`; a value of the right type outside its range
:class:`ValueError`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal, overload

__all__ = ["check_bool", "check_float", "check_int", "check_mapping", "describe_value"]


def describe_value(value: object) -> str:
    """``repr(value)`` with its type, for messages: ``'no' (str)``."""
    return f"{value!r} ({type(value).__name__})"


@overload
def check_bool(name: str, value: object, optional: Literal[False] = False) -> bool: ...
@overload
def check_bool(name: str, value: object, optional: bool) -> bool | None: ...
def check_bool(name: str, value: object, optional: bool = False) -> bool | None:
    """``value`` if it is ``True`` or ``False`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        valid = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be {valid}, got {describe_value(value)}")
    return value


@overload
def check_int(
    name: str, value: object, minimum: int | None = None, optional: Literal[False] = False
) -> int: ...
@overload
def check_int(name: str, value: object, minimum: int | None, optional: bool) -> int | None: ...
def check_int(name: str, value: object, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int: an integer, or a float with no fractional part (YAML's ``2.0``); never a
    bool. ``minimum`` bounds it from below (ValueError)."""
    if value is None and optional:
        return None
    whole = isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer()
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or whole):
        valid = "an integer or None" if optional else "an integer"
        raise TypeError(f"{name} must be {valid}, got {describe_value(value)}")
    number = int(value)  # type: ignore[call-overload]
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


@overload
def check_float(
    name: str, value: object, valid: str = "a finite number", optional: Literal[False] = False
) -> float: ...
@overload
def check_float(name: str, value: object, valid: str, optional: bool) -> float | None: ...
def check_float(
    name: str, value: object, valid: str = "a finite number", optional: bool = False
) -> float | None:
    """``value`` as a finite float (ints accepted, bools refused). ``valid`` describes the accepted
    values in messages; range checks are the caller's (ValueError)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        choices = f"{valid} or None" if optional else valid
        raise TypeError(f"{name} must be {choices}, got {describe_value(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    return number


def check_mapping(name: str, value: object) -> dict[str, Any]:
    """A copy of ``value`` if it is a mapping with string keys (e.g. ``{"sample_ratio": 0.01}``)."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise TypeError(f"{name} must be a dict of option names to values, got {describe_value(value)}")
    return dict(value)
