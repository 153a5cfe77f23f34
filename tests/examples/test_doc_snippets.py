"""Every ```python block of README.md and docs/**/*.md runs as written.

A block runs in this process, in a fresh namespace with a temporary working directory, unless the
line just before it is an HTML comment:

* ``<!-- snippet: 2-process REASON -->``: the block is a script whose Trainer or Fabric launches a
  second CPU process; it runs as ``python block.py`` in a child process (the launcher re-runs the
  script for rank 1);
* ``<!-- snippet: skip REASON -->``: not run (keep these rare); the skips and their reasons are
  reported by ``test_skipped_snippets_are_few_and_give_a_reason``.

A block fails the test when it raises (or its process exits non-zero). The blocks set their own small
sizes; nothing here shrinks them.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from launch import free_port, run_script

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*snippet:\s*(?P<kind>[\w-]+)\s*(?P<reason>.*?)\s*-->\s*$")
_KINDS = ("2-process", "skip")


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    code: str
    kind: str  # "in-process", "2-process" or "skip"
    reason: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO).as_posix()}:{self.line}"


def extract(page: Path) -> list[Snippet]:
    """The page's python blocks, each with the marker comment on the line before it (if any)."""
    text = page.read_text()
    snippets = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        kind, reason = ("in-process", "") if marker is None else (marker["kind"], marker["reason"])
        code = "\n".join(row[len(match["indent"]) :] for row in match["code"].splitlines())
        snippets.append(Snippet(page, line, code, kind, reason))
    return snippets


SNIPPETS = [snippet for page in PAGES for snippet in extract(page)]


def test_the_pages_have_python_blocks_and_markers_are_known() -> None:
    pages = {snippet.page.name for snippet in SNIPPETS}
    assert {"README.md", "usage.md", "checkpoints.md", "nodes.md"} <= pages
    for snippet in SNIPPETS:
        assert snippet.kind in ("in-process", *_KINDS), f"{snippet.name}: unknown marker {snippet.kind!r}"
    # The extractor itself: a marked block, an unmarked one and an indented one.
    sample = REPO / "tests" / "examples" / "_sample.md"
    text = (
        "intro\n\n<!-- snippet: skip needs 8 GPUs -->\n```python\nx = 1\n```\n\n"
        "* item\n\n  ```python\n  y = 2\n  ```\n"
    )
    try:
        sample.write_text(text)
        first, second = extract(sample)
    finally:
        sample.unlink()
    assert (first.kind, first.reason, first.code, first.line) == ("skip", "needs 8 GPUs", "x = 1", 4)
    assert (second.kind, second.code) == ("in-process", "y = 2")


def test_skipped_snippets_are_few_and_give_a_reason() -> None:
    skipped = [s for s in SNIPPETS if s.kind == "skip"]
    print(f"{len(SNIPPETS)} python blocks, {len(skipped)} skipped")
    for snippet in skipped:
        print(f"  skipped {snippet.name}: {snippet.reason}")
        assert snippet.reason, f"{snippet.name}: a skip must say why"
    assert len(skipped) <= max(1, len(SNIPPETS) // 10), "keep skipped snippets rare"


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.kind == "in-process"], ids=lambda s: s.name)
def test_snippet_runs_in_process(snippet: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # A snippet that starts a one-process group (plain DDP) reads these; a free port avoids clashes.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    code = compile(snippet.code, snippet.name, "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(code, {"__name__": "__main__"})


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.kind == "2-process"], ids=lambda s: s.name)
def test_snippet_runs_on_two_processes(snippet: Snippet, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code + "\n")
    proc = run_script([script], cwd=tmp_path, env={"PYTHONWARNINGS": "ignore"}, timeout=300)
    output = proc.output
    assert "MEMBER: 2/2" in output, f"{snippet.name} did not start 2 processes:\n{output[-2000:]}"
