"""A name -> class registry with constructor-option validation (shared by compressors and methods)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes selectable by their ``name`` attribute.

    Args:
        kind: what is registered, for messages ("compressor", "method").
        list_label: how the message for an unknown name introduces the valid ones.
    """

    def __init__(self, kind: str, list_label: str) -> None:
        self.kind = kind
        self.list_label = list_label
        #: name -> class; exported read-only by convention (``COMPRESSORS``, ``METHODS``).
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make ``cls`` selectable by ``cls.name``."""
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} has no `name`")
        taken = self.classes.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"{self.kind} name {name!r} is already taken by {taken.__name__}")
        self.classes[name] = cls
        return cls

    def get(self, name: object) -> type[T]:
        """The class registered as ``name`` (case-insensitive).

        Raises:
            ValueError: unknown name; the message lists the valid ones.
        """
        cls = self.classes.get(name.lower()) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(
                f"unknown {self.kind} {name!r}; {self.list_label}: {', '.join(sorted(self.classes))}"
            )
        return cls

    def option_names(self, name: str, skip: Iterable[str] = ()) -> list[str]:
        """Constructor arguments of a registered class, minus ``self`` and ``skip``."""
        excluded = {"self", *skip}
        return [p for p in inspect.signature(self.get(name).__init__).parameters if p not in excluded]

    def check_options(self, name: str, options: dict[str, Any], skip: Iterable[str] = ()) -> None:
        """Raise a ValueError naming the accepted options if ``options`` has one the class does not take."""
        accepted = self.option_names(name, skip)
        unknown = [key for key in options if key not in accepted]
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} does not take option(s) {unknown}; "
                f"it accepts: {accepted or 'no options'}"
            )
