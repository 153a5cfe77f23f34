"""One planted bug: an exact source edit and the tests that must fail once it is made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlantedBug:
    """``old`` replaced by ``new`` once in ``path``; every test of ``tests`` must then fail.

    Attributes:
        name: short id (``--only NAME``).
        what: the bug in words (the table's first column).
        path: the edited file, relative to the repository root.
        old, new: the exact text replaced, and its replacement.
        tests: pytest node ids (or files) that must fail.
    """

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
