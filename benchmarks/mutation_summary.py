"""Summarise ``mutmut results --all true`` per source file: a Markdown table and the overall score.

    python benchmarks/mutation_summary.py mutants/results.txt

The score is killed / (killed + survived + timeout): mutants that no test of the fast subset reaches
("no tests") are counted in their own column, not in the score (docs/testing.md says which tests cover
them).
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious", "skipped")


def summarise(lines: list[str]) -> str:
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        per_module[_module_of(name)][status] += 1
    rows = ["| module | mutants | " + " | ".join(COLUMNS) + " | score |", "|---" * (len(COLUMNS) + 3) + "|"]
    total: Counter[str] = Counter()
    for module in sorted(per_module):
        counts = per_module[module]
        total.update(counts)
        rows.append(_row(module, counts))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _module_of(mutant: str) -> str:
    """``lightning_gmc.methods.gmc.xǁGMCǁencode__mutmut_3`` -> ``lightning_gmc.methods.gmc``."""
    head = mutant.split("__mutmut_")[0]
    parts = head.split(".")
    while parts and (parts[-1].startswith("x") and ("\u01c1" in parts[-1] or parts[-1].startswith("x_"))):
        parts.pop()
    return ".".join(parts)


def _row(module: str, counts: Counter[str]) -> str:
    scored = counts["killed"] + counts["survived"] + counts["timeout"]
    score = f"{100 * counts['killed'] / scored:.1f} %" if scored else "-"
    cells = " | ".join(str(counts[c]) for c in COLUMNS)
    return f"| {module} | {sum(counts.values())} | {cells} | {score} |"


def main(argv: list[str]) -> int:
    print(summarise(Path(argv[0]).read_text().splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
