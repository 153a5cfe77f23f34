"""pyproject's required dependencies are exactly the third-party packages ``lightning_gmc`` imports, and
its metadata is complete (license file, console script, project URLs)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _imported_top_level_modules(package: Path) -> set[str]:
    modules: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_required_dependencies_are_what_the_package_imports() -> None:
    imported = _imported_top_level_modules(REPO / "lightning_gmc")
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "lightning_gmc"}
    providers = importlib.metadata.packages_distributions()
    needed = {_name(providers[module][0]) for module in third_party}
    declared = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    assert declared == needed, f"declared {sorted(declared)}, imported {sorted(needed)}"
    # The examples' packages are extras, not requirements of the library.
    extras = _pyproject()["project"]["optional-dependencies"]
    for name in ("torchvision", "torchmetrics", "scikit-learn"):
        assert name not in declared
        assert name in {_name(r) for r in extras["examples"]}
    # The dev extra installs the examples extra's packages (the tests run the examples) and the build.
    dev = {_name(r) for r in extras["dev"]}
    assert {_name(r) for r in extras["examples"]} <= dev
    assert {"build", "setuptools", "pytest", "ruff", "mypy"} <= dev


def test_metadata_names_the_license_script_and_urls() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert (
        "Apache License" in text
        and "Version 2.0, January 2004" in text
        and "END OF TERMS AND CONDITIONS" in text
    )
    assert project["scripts"] == {"lightning-gmc": "lightning_gmc.cli:main"}
    assert {"Homepage", "Source", "Documentation", "Changelog", "Issues"} <= set(project["urls"])
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in project["classifiers"])
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639: the expression
