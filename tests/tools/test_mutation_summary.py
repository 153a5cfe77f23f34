"""The mutation summary's survivor classes (tools/mutation_summary.py) on diffs of real mutants."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from mutation_summary import classify, module_of, summarise  # noqa: E402


@pytest.mark.parametrize(
    ("removed", "added", "expected"),
    [
        # the text of an error message
        (
            ['raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")'],
            ["raise ValueError(None)"],
            "message",
        ),
        (
            ['    f"lightning_gmc: the support broadcast of bucket {key[0]} (message {key[1]}) at step "'],
            ['    f"lightning_gmc: the support broadcast of bucket {key[1]} (message {key[1]}) at step "'],
            "message",
        ),
        # a string compared with: not a message
        (['if self.wire_dtype == "fp32":'], ['if self.wire_dtype == "XXfp32XX":'], "other"),
        (["for a, b in zip(xs, ys, strict=True):"], ["for a, b in zip(xs, ys, ):"], "zip_strict"),
        (
            ["return torch.topk(chunk, k, sorted=False).indices"],
            ["return torch.topk(chunk, k, sorted=True).indices"],
            "order",
        ),
        (
            ["sample = torch.randint(n, (draws,), generator=gen, device=device)"],
            ["sample = torch.randint(n, (draws,), generator=gen, device=None)"],
            "device",
        ),
        (
            ['magnitude = plan.workspace.tensor("abs", plan.numel, x.dtype, x.device)'],
            ['magnitude = plan.workspace.tensor("XXabsXX", plan.numel, x.dtype, x.device)'],
            "workspace_key",
        ),
        # arithmetic and arguments that carry values are never equivalent by pattern
        (["self._messages += 1"], ["self._messages += 2"], "other"),
        (
            ["x.index_add_(0, index, values, alpha=-1.0)"],
            ["x.index_add_(0, index, values, alpha=-2.0)"],
            "other",
        ),
    ],
)
def test_survivors_are_classified_by_what_their_diff_changes(
    removed: list[str], added: list[str], expected: str
) -> None:
    assert classify("lightning_gmc.methods.dgc.xǁDGCǁencode", removed, added) == expected


def test_labels_are_never_equivalent() -> None:
    # describe() is the summary line and what a resume compares: its mutants must be killed
    assert (
        classify("lightning_gmc.methods.gmc.xǁGMCǁdescribe", ['label = "gmc"'], ['label = "GMC"']) == "other"
    )


def test_summary_scores_with_and_without_the_equivalent_survivors() -> None:
    statuses = [
        ("lightning_gmc.methods.gmc.xǁGMCǁencode__mutmut_1", "killed"),
        ("lightning_gmc.methods.gmc.xǁGMCǁencode__mutmut_2", "killed"),
        ("lightning_gmc.methods.gmc.xǁGMCǁencode__mutmut_3", "survived"),
        ("lightning_gmc.transport.routing.x_choose_route__mutmut_1", "survived"),
        ("lightning_gmc.transport.routing.x_choose_route__mutmut_2", "no tests"),
    ]
    classes = {
        "lightning_gmc.methods.gmc.xǁGMCǁencode__mutmut_3": "message",
        "lightning_gmc.transport.routing.x_choose_route__mutmut_1": "other",
    }
    report = summarise(statuses, classes)
    assert module_of(statuses[0][0]) == "lightning_gmc.methods.gmc"
    assert "| lightning_gmc.methods.gmc | 3 | 2 | 1 | 0 | 0 | 0 | 0 | 66.7 % |" in report
    assert "| lightning_gmc.transport.routing | 2 | 0 | 1 | 0 | 1 | 0 | 0 | 0.0 % |" in report
    assert "Raw score 50.0 % (2 of 4); without the 1 equivalent survivors 66.7 % (2 of 3)." in report
