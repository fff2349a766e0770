"""Terminal output of a run: one progress line per round, byte counts and durations."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from experiments.results.summary import finite_or_none, summarize

BYTE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")  # SI decimal prefixes (1 kB = 1000 B)
BYTE_UNIT_STEP = 1000.0


def format_bytes(n: float) -> str:
    """A byte count with SI decimal units: ``0 B``, ``999 B``, ``1.2 kB``, ``3.4 MB``, ``1.0 GB``.

    Raises
    ------
    ValueError
        If ``n`` is negative or not finite.
    """
    value = float(n)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"byte count must be a finite number >= 0, got {n!r}")
    unit = 0  # bytes print as whole numbers, larger units with one decimal
    while unit < len(BYTE_UNITS) - 1 and round(value, 1 if unit else 0) >= BYTE_UNIT_STEP:
        value /= BYTE_UNIT_STEP
        unit += 1
    return f"{round(value)} B" if unit == 0 else f"{value:.1f} {BYTE_UNITS[unit]}"


def format_duration(seconds: float) -> str:
    """Seconds as ``6 s``, ``2 min 5 s`` or ``1 h 3 min`` (for ETAs)."""
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def _format_accuracy(value: Any) -> str:
    number = finite_or_none(value)
    return "-" if number is None else f"{number:.3f}"


def _before(record: Mapping[str, Any]) -> str:
    """`` (pre-trained 0.650)`` when the round records the pre-trained model's accuracy, else ``""``."""
    before = finite_or_none(record.get("pretrained_accuracy"))
    return "" if before is None else f" (pre-trained {before:.3f})"


class ProgressLine:
    """One terminal line per finished round.

    Example: ``round 3/10  acc 0.812 (pre-trained 0.650)  global 0.790  up 1.2 MB  down 3.4 MB  virtual 12.3 s
    wall 4.5 s  ETA 30 s``. ``up``, ``down``, ``virtual`` and ``wall`` are running totals over
    the rounds seen so far; ETA = mean wall time per seen round x rounds left
    (``total_rounds - round``).

    Parameters
    ----------
    total_rounds
        Rounds the run will do (> 0).
    stream
        Where lines go; None means ``sys.stdout`` at the time of each update.
    seen
        Records of rounds finished before (a resumed run): counted in totals, not printed.
    """

    def __init__(
        self, total_rounds: int, stream: TextIO | None = None, seen: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        if isinstance(total_rounds, bool) or not isinstance(total_rounds, int) or total_rounds < 1:
            raise ValueError(f"total_rounds must be a positive integer, got {total_rounds!r}")
        self.total_rounds = total_rounds
        self.stream = stream
        self._seen: list[Mapping[str, Any]] = list(seen)

    def update(self, record: Mapping[str, Any]) -> str:
        """Print the line for ``record`` (a round record) and return it."""
        self._seen.append(record)
        totals = summarize(self._seen)
        walls = [finite_or_none(seen.get("wall_time_s")) for seen in self._seen]
        walls = [wall for wall in walls if wall is not None]
        rounds_left = max(self.total_rounds - int(record["round"]), 0)
        eta = format_duration(sum(walls) / len(walls) * rounds_left) if walls else "?"
        line = (
            f"round {record['round']}/{self.total_rounds}"
            f"  acc {_format_accuracy(record.get('accuracy'))}{_before(record)}"
            f"  global {_format_accuracy(record.get('global_accuracy'))}"
            f"  up {format_bytes(totals['total_uplink_bytes'])}"
            f"  down {format_bytes(totals['total_downlink_bytes'])}"
            f"  virtual {totals['sim_time_s']:.1f} s"
            f"  wall {totals['wall_time_s']:.1f} s"
            f"  ETA {eta}"
        )
        print(line, file=self.stream or sys.stdout, flush=True)
        return line
