"""Golden tests: write the table of every comparison when ``EDGECLOUD_CONFORMANCE`` names a file.

``EDGECLOUD_CONFORMANCE=conformance.md python -m pytest tests/golden -q`` leaves a markdown table
(fixture, reference at commit, what is compared, max abs difference, tolerance) for
``docs/CONFORMANCE.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.golden.fixture import COMPARISONS

#: Environment variable naming the table to write.
REPORT_ENV = "EDGECLOUD_CONFORMANCE"


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get(REPORT_ENV)
    if not target or not COMPARISONS:
        return
    lines = [
        "| fixture | reference | compared | max abs difference | tolerance |",
        "|---|---|---|---|---|",
    ]
    for c in COMPARISONS:
        lines.append(f"| `{c.fixture}` | {c.reference} | {c.what} | {c.diff:.2g} | {c.tolerance:.0e} |")
    Path(target).write_text("\n".join(lines) + "\n")
