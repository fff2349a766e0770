"""Golden fixtures: fixed inputs and the outputs an official reference implementation computed on them.

A fixture is one ``.npz`` file under ``tests/golden/fixtures/``: named arrays (inputs, expected
outputs, initial weights) plus a ``__source__`` entry, a JSON object that says where the expected
outputs come from and how close the project must come to them:

``repository``, ``commit``
    The reference implementation, e.g. ``chenyaofo/CEMA`` at a 40-hex commit.
``file``, ``function``
    What was run, e.g. ``codebase/core/tta/cema.py``, ``CEMA.infer``.
``produced_by``
    The command that wrote the fixture (a ``make_*.py`` script beside the tests, run with a
    checkout of the reference; the reference code itself is never copied into the project).
``tolerance``
    Largest absolute difference the golden test accepts.
``notes``
    What the harness had to supply around the reference (e.g. a CPU instead of ``.cuda()``).

The ``make_*`` scripts import the reference from a checkout given on their command line;
the ``test_*`` files only read fixtures, so the suite needs no reference installed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Where fixtures live.
FIXTURES = Path(__file__).parent / "fixtures"
#: Keys every fixture's source must name.
SOURCE_KEYS = ("repository", "commit", "file", "function", "produced_by", "tolerance", "notes")
#: The key of the source entry inside the ``.npz``.
SOURCE_ENTRY = "__source__"


@dataclass(frozen=True)
class Fixture:
    """One golden fixture: its arrays and where they come from.

    Attributes
    ----------
    name : str
        File stem under :data:`FIXTURES`.
    arrays : dict of str to ndarray
        Inputs and expected outputs.
    source : dict
        The :data:`SOURCE_KEYS` entries.
    """

    name: str
    arrays: dict[str, np.ndarray]
    source: dict

    @property
    def tolerance(self) -> float:
        """Largest absolute difference accepted against the reference."""
        return float(self.source["tolerance"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


def fixture_path(name: str) -> Path:
    """Path of fixture ``name`` (without the ``.npz`` suffix)."""
    return FIXTURES / f"{name}.npz"


def load(name: str) -> Fixture:
    """Read fixture ``name``; ValueError if its source misses a required key."""
    path = fixture_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no golden fixture {path}; regenerate it with the make_*.py script named in CONFORMANCE.md")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files if key != SOURCE_ENTRY}
        source = json.loads(str(data[SOURCE_ENTRY]))
    missing = [key for key in SOURCE_KEYS if key not in source]
    if missing:
        raise ValueError(f"fixture {name} lacks source keys {missing}; every fixture names {SOURCE_KEYS}")
    return Fixture(name, arrays, source)


def save(name: str, arrays: dict[str, np.ndarray], source: dict) -> Path:
    """Write fixture ``name`` (used by the ``make_*`` scripts); checks the source keys first."""
    missing = [key for key in SOURCE_KEYS if key not in source]
    if missing:
        raise ValueError(f"source lacks {missing}; name {SOURCE_KEYS}")
    source = {**source, "produced_by": portable_command(source["produced_by"], source["repository"])}
    if SOURCE_ENTRY in arrays:
        raise ValueError(f"{SOURCE_ENTRY} is reserved for the source")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = fixture_path(name)
    payload = {key: np.asarray(value) for key, value in arrays.items()}
    np.savez_compressed(path, **payload, **{SOURCE_ENTRY: np.asarray(json.dumps(source, sort_keys=True))})
    return path


def portable_command(command: str, repository: str) -> str:
    """``command`` with the local path after ``--reference`` replaced by ``<clone of repository>``.

    A fixture records how to regenerate it on any machine, not where one machine kept the reference.
    """
    return re.sub(r"--reference\s+\S+", f"--reference <clone of {repository}>", command)


def max_abs_diff(actual, expected) -> float:
    """Largest absolute difference between two arrays (or tensors) of the same shape."""
    a, b = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} differs from the reference's {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def assert_close(actual, expected, tolerance: float, what: str) -> float:
    """Assert ``max |actual - expected| <= tolerance``; return the difference."""
    diff = max_abs_diff(actual, expected)
    assert diff <= tolerance, f"{what}: max abs difference {diff:.3g} from the reference exceeds {tolerance:.3g}"
    return diff


@dataclass(frozen=True)
class Comparison:
    """One checked agreement, for the conformance table (``docs/CONFORMANCE.md``)."""

    fixture: str
    reference: str
    what: str
    diff: float
    tolerance: float


#: Every comparison :func:`check` made in this process, in order.
COMPARISONS: list[Comparison] = []


def check(fixture: Fixture, actual, key: str, what: str, tolerance: float | None = None) -> float:
    """Compare ``actual`` with ``fixture[key]`` at the fixture's tolerance (or ``tolerance``) and record it.

    Returns the max absolute difference; raises AssertionError when it exceeds the tolerance.
    """
    limit = fixture.tolerance if tolerance is None else float(tolerance)
    diff = assert_close(actual, fixture[key], limit, f"{fixture.name}/{key} ({what})")
    reference = f"{fixture.source['repository']}@{fixture.source['commit'][:7]}"
    COMPARISONS.append(Comparison(fixture.name, reference, what, diff, limit))
    return diff


def exact(fixture: Fixture, actual, key: str, what: str) -> None:
    """Assert ``actual`` equals ``fixture[key]`` exactly (indices, masks, chosen sets) and record it."""
    check(fixture, actual, key, what, tolerance=0.0)
