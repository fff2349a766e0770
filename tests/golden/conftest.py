"""Golden tests: write the table of every comparison when ``EDGECLOUD_CONFORMANCE`` names a file.

``EDGECLOUD_CONFORMANCE=conformance.md python -m pytest tests/golden -q`` leaves a markdown table
for ``docs/CONFORMANCE.md``: one row per fixture (reference at commit, what is compared, how many
comparisons, the largest absolute difference and the loosest tolerance among them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.golden.fixture import COMPARISONS, Comparison

#: Environment variable naming the table to write.
REPORT_ENV = "EDGECLOUD_CONFORMANCE"
#: Words of a comparison's description that name one instance: a number (a batch, a step, a
#: setting) or a parameter name (``features.1.weight``), with the punctuation that follows it.
INSTANCE_WORD = re.compile(r"^\(?([-+]?\d[\d.e+-]*|[\w.]*\.\d+\.[\w.]+)(?P<tail>[,:;)]*)$")


def subject(what: str) -> str:
    """A comparison's description without the words naming its instance (``features.1.weight``, ``2``).

    Closing parentheses after a dropped word stay; pipes are escaped for a markdown cell.
    """
    words = []
    for word in what.split():
        match = INSTANCE_WORD.match(word)
        words.append(match["tail"].replace(",", "").replace(":", "").replace(";", "") if match else word)
    kept = re.sub(r"\(\s*\)|\s+(?=[,:;)])", "", " ".join(w for w in words if w)).strip(" :,")
    return kept.replace("|", "\\|")


def fixture_rows(comparisons: list[Comparison]) -> list[str]:
    """One markdown row per fixture, in the order the fixtures were first compared."""
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault((c.fixture, c.reference), []).append(c)
    rows = []
    for (fixture, reference), items in groups.items():
        subjects = list(dict.fromkeys(subject(c.what) for c in items))
        diff = max(c.diff for c in items)
        tolerance = max(c.tolerance for c in items)
        rows.append(f"| `{fixture}` | {reference} | {'; '.join(subjects)} | {len(items)} | {diff:.2g} | {tolerance:.0e} |")
    return rows


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get(REPORT_ENV)
    if not target or not COMPARISONS:
        return
    lines = [
        "| fixture | reference | compared | comparisons | max abs difference | tolerance |",
        "|---|---|---|---|---|---|",
        *fixture_rows(COMPARISONS),
    ]
    Path(target).write_text("\n".join(lines) + "\n")
