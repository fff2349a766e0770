"""Moving a stale result out of the way instead of overwriting it (nothing already written is lost)."""

from __future__ import annotations

from pathlib import Path


def free_name(path: Path) -> Path:
    """``<path>.stale-<n>`` with the first ``n`` >= 1 that names nothing yet (a stale result's new place)."""
    n = 1
    while path.with_name(f"{path.name}.stale-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.stale-{n}")


def move_aside(path: Path) -> Path | None:
    """Rename ``path`` (a file or folder) to :func:`free_name` of it; returns the new place, None if absent."""
    if not path.exists():
        return None
    aside = free_name(path)
    path.rename(aside)
    return aside
