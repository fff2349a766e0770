"""Every golden fixture names its source and stays small."""

import re

import pytest

from tests.golden.fixture import FIXTURES, load

#: A fixture is a few kB (the issue's bound); this leaves room for a small network's weights.
MAX_BYTES = 64_000
NAMES = sorted(p.stem for p in FIXTURES.glob("*.npz"))


def test_there_are_fixtures():
    assert NAMES, f"no golden fixtures under {FIXTURES}"


@pytest.mark.parametrize("name", NAMES)
def test_fixture_names_its_source_and_is_small(name):
    fixture = load(name)
    assert re.fullmatch(r"[0-9a-f]{40}", fixture.source["commit"]), fixture.source["commit"]
    assert "/" in fixture.source["repository"]
    assert fixture.tolerance >= 0
    assert (FIXTURES / f"{name}.npz").stat().st_size <= MAX_BYTES
