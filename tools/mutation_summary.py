"""Summarise a mutmut run: the score per module, and the surviving mutants sorted into classes.

    python tools/mutation_summary.py          # from the repository root, after `mutmut run`

Prints a Markdown table per source module (killed, survived, timeout, no tests, ...) with the raw
score ``killed / (killed + survived + timeout)``; mutants that no test of the fast subset reaches
("no tests") have their own column and are not scored. Then it sorts the survivors by what their
diff changes (``classify``) and prints the score without those judged equivalent. The diffs of every
survivor, grouped by class, go to ``mutants/survivors.md`` for review (docs/testing.md says how the
classes were judged).
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious", "skipped")

#: Survivor classes judged equivalent: the behaviour a user can observe is unchanged.
EQUIVALENT = {
    "message": "changes only the text of an error or log message",
    "zip_strict": "drops zip(..., strict=True) over sequences of equal length by construction",
    "workspace_key": "renames a scratch-buffer key: a fresh buffer, the same values",
    "order": "changes topk's sorted= flag: the same index set in another order (decoding ignores order)",
}
#: Survivor classes that are real changes no test here can see.
UNOBSERVABLE = {
    "device": "drops a device argument: the same on CPU; the CUDA tests (GPU only) check that path",
}

_STRING = re.compile(r'f?"(?:[^"\\]|\\.)*"')
_MESSAGE_LINE = re.compile(r"raise |Error\(|log\.|warn|rank_zero_|^\s*f?\"[^\"]*\"\s*\)?,?$")


def classify(function: str, removed: list[str], added: list[str]) -> str:
    """The class of one surviving mutant, from its function name and the lines its diff changes."""
    old, new = " ".join(s.strip() for s in removed), " ".join(s.strip() for s in added)
    if "strict=True" in old and "strict=True" not in new:
        return "zip_strict"
    if "sorted=" in old and old.replace("sorted=False", "").replace("sorted=True", "") == new.replace(
        "sorted=True", ""
    ).replace("sorted=None", "").replace("sorted=False", ""):
        return "order"
    if re.search(r"\bdevice\b", old) and _drops_device(old, new):
        return "device"
    if re.search(r"(workspace|\.tensor|\.constant)\(", old) and _only_first_string_changed(old, new):
        return "workspace_key"
    if any(_MESSAGE_LINE.search(line) for line in removed) and _only_strings_changed(old, new):
        return "message"
    return "other"


def _drops_device(old: str, new: str) -> bool:
    stripped = re.sub(r",?\s*device=[\w.]+", "", old)
    stripped = re.sub(r"\((x|flags|self\.bucket|grad)\.device,?\s*", "(", stripped)
    candidates = {re.sub(r"\s+", "", stripped), re.sub(r"\s+", "", old.replace("device", "None", 1))}
    new_flat = re.sub(r"\s+", "", re.sub(r"device=None", "", new)).replace(",)", ")")
    return any(new_flat == c.replace(",)", ")") for c in candidates) or "device=None" in new


def _only_strings_changed(old: str, new: str) -> bool:
    # Same code once every string literal (or a literal replaced by None) is blanked out.
    def blank(text: str) -> str:
        return re.sub(r"\bNone\b", "S", _STRING.sub("S", text))

    return blank(old) == blank(new) and old != new


def _only_first_string_changed(old: str, new: str) -> bool:
    first_old, first_new = _STRING.search(old), _STRING.search(new) or re.search(r"\(None,", new)
    return first_old is not None and first_new is not None and _only_strings_changed(old, new)


def summarise(statuses: Iterable[tuple[str, str]], classes: dict[str, str]) -> str:
    """The per-module table, then the survivor classes and the score without the equivalent ones."""
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    for name, status in statuses:
        per_module[module_of(name)][status] += 1
    rows = ["| module | mutants | " + " | ".join(COLUMNS) + " | score |", "|---" * (len(COLUMNS) + 3) + "|"]
    total: Counter[str] = Counter()
    for module in sorted(per_module):
        total.update(per_module[module])
        rows.append(_row(module, per_module[module]))
    rows.append(_row("**all**", total))
    counted = Counter(classes.values())
    rows.append("\nSurvivors by class:\n")
    for name, why in {**EQUIVALENT, **UNOBSERVABLE, "other": "everything else (reviewed by hand)"}.items():
        kind = "equivalent" if name in EQUIVALENT else "not equivalent"
        rows.append(f"* `{name}` ({kind}): {counted[name]}: {why}")
    equivalent = sum(counted[name] for name in EQUIVALENT)
    scored = total["killed"] + total["survived"] + total["timeout"]
    if scored:
        killed, rest = total["killed"], scored - equivalent
        rows.append(
            f"\nRaw score {100 * killed / scored:.1f} % ({killed} of {scored}); without the "
            f"{equivalent} equivalent survivors {100 * killed / rest:.1f} % ({killed} of {rest})."
        )
    return "\n".join(rows)


def module_of(mutant: str) -> str:
    """``lightning_gmc.methods.gmc.xǁGMCǁencode__mutmut_3`` -> ``lightning_gmc.methods.gmc``."""
    parts = mutant.split("__mutmut_")[0].split(".")
    while parts and parts[-1].startswith("x") and ("\u01c1" in parts[-1] or parts[-1].startswith("x_")):
        parts.pop()
    return ".".join(parts)


def _row(module: str, counts: Counter[str]) -> str:
    scored = counts["killed"] + counts["survived"] + counts["timeout"]
    score = f"{100 * counts['killed'] / scored:.1f} %" if scored else "-"
    cells = " | ".join(str(counts[c]) for c in COLUMNS)
    return f"| {module} | {sum(counts.values())} | {cells} | {score} |"


def _changed_lines(diff: str) -> tuple[list[str], list[str]]:
    lines = diff.splitlines()
    removed = [line[1:] for line in lines if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in lines if line.startswith("+") and not line.startswith("+++")]
    return removed, added


def main() -> int:
    from mutmut import __main__ as mutmut  # the mutation extra; reads the run's mutants/ (config lazily)

    statuses, classes, diffs = [], {}, defaultdict(list)
    for path in mutmut.walk_mutatable_files():
        data = mutmut.SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            status = mutmut.status_by_exit_code[code]
            statuses.append((name, status))
            if status == "survived":
                diff = mutmut.get_diff_for_mutant(name, path=path)
                classes[name] = classify(name.split("__mutmut_")[0], *_changed_lines(diff))
                diffs[classes[name]].append(f"#### {name}\n\n```diff\n{diff.strip()}\n```\n")
    report = summarise(statuses, classes)
    print(report)
    Path("mutants/summary.md").write_text(report + "\n")
    with Path("mutants/survivors.md").open("w") as out:
        for name in sorted(diffs):
            out.write(f"## {name} ({len(diffs[name])})\n\n" + "\n".join(diffs[name]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
