"""Seeds of a claims preset: which seeds run, which runs count, and one value per seed.

A claims preset runs every condition (method, partition, severity, ...) once per seed into
``<condition folder>/seed<seed>`` and reports, per cell, the mean and the two-sided 95 %
Student-t interval over the seeds (:mod:`experiments.results.intervals`). A difference or ratio
that a target is judged on is formed seed by seed first (paired: both methods ran on that seed's
data, devices and pre-trained model), and the target counts as met only when the whole interval
clears it. Only completed runs count; a seed whose run is missing, failed or unfinished is a
NaN, which the interval drops, so ``n`` in the table shows it.

The API a preset uses:

- :func:`add_seed_arguments` -- ``--seeds S [S ...]`` (default :data:`DEFAULT_SEEDS`) and
  ``--no-run`` (write the tables from the runs that already finished, start none);
- :func:`seed_dir` -- the run folder of one seed below a condition's folder;
- :func:`completed` -- whether a run record counts (status ``completed``);
- :func:`per_seed` -- one value per seed of a condition's runs, NaN where it did not complete;
- :func:`cell` -- ``"87.7 ± 1.2 (n=3)"`` for a table cell;
- :func:`target_line` -- a target's interval, its bound and its verdict, as one markdown bullet;
- :func:`unfinished` -- which (condition, seed) runs did not complete, for the caption;
- :func:`seeds_caption` -- the caption sentence naming the interval method and the seeds;
- :func:`command_line` -- the command that reproduces a table (``--no-run`` left out);
- :func:`runs_wall_time_s` -- the summed wall time of the runs that count (a table may be
  finished across several invocations, so one invocation's time says little).

``experiments.resume.cached_run.run_cached(run_dir, overrides, run=False)`` is the ``--no-run`` side:
it returns a finished run with the configuration asked for, or ``cached_run.not_finished()``, and never
starts, moves or deletes anything.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from experiments.results.intervals import METHOD_CAPTION, Interval, mean_interval, verdict
from experiments.resume.cached_run import MISSING

#: Seeds every preset runs unless told otherwise: three fit a 2-core machine's budget for the claims
#: tables, and the interval's t factor falls from 12.71 at two seeds to 4.30 at three.
DEFAULT_SEEDS = (0, 1, 2)
#: Status experiments.run writes into results.json when a run finished.
COMPLETED = "completed"
NO_RUN = "--no-run"


class _SeedList(argparse.Action):
    """``--seeds`` stores the list as given, refusing repeats (a repeated seed would be counted twice)."""

    def __call__(self, parser, namespace, values, option_string=None):
        repeated = sorted({s for s in values if list(values).count(s) > 1})
        if repeated:
            raise argparse.ArgumentError(self, f"seed {repeated[0]} is given twice; list each seed once")
        setattr(namespace, self.dest, list(values))


def add_seed_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--seeds`` (one or more distinct integers, default :data:`DEFAULT_SEEDS`) and ``--no-run``."""
    parser.add_argument(
        "--seeds", type=int, nargs="+", action=_SeedList, default=list(DEFAULT_SEEDS),
        help=f"seeds to run and average over (default: {' '.join(map(str, DEFAULT_SEEDS))})",
    )
    parser.add_argument(
        NO_RUN, action="store_true",
        help="start no run: write the tables from the runs that already finished (the rest count as missing)",
    )


def seed_dir(condition_dir: Path, seed: int) -> Path:
    """The run folder of ``seed`` below a condition's folder: ``<condition_dir>/seed<seed>``."""
    return Path(condition_dir) / f"seed{seed}"




def completed(run: Mapping | None) -> bool:
    """Whether ``run`` (a results.json record) finished, i.e. counts in a mean."""
    return bool(run) and run.get("status") == COMPLETED


def per_seed(
    runs: Mapping[int, Mapping], value: Callable[[Mapping], float | None], seeds: Sequence[int]
) -> list[float]:
    """``value(run)`` for each seed in ``seeds`` order; NaN where the run did not complete or gives None.

    Taking ``seeds`` explicitly keeps two conditions' lists aligned seed by seed, which the paired
    differences and ratios of :mod:`experiments.results.intervals` rely on.
    """
    values = []
    for seed in seeds:
        run = runs.get(seed)
        number = value(run) if completed(run) else None
        values.append(math.nan if number is None else float(number))
    return values


def cell(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``"87.7 ± 1.2 (n=3)"``: mean ± 95 % half-width of ``values`` times ``scale``; ``-`` when none."""
    interval = mean_interval(values)
    return "-" if interval.n == 0 else f"{interval.format(scale, digits)} (n={interval.n})"


def target_line(
    label: str, interval: Interval, target: float, at_least: bool, scale: float = 1.0, digits: int = 2, unit: str = ""
) -> str:
    """One markdown bullet: the measured interval, the target it is judged on and the verdict.

    ``- ECLM - FedAvg: 21.7 ± 3.1 points (n=3; target >= 0.0 points): met``. The verdict is
    :func:`experiments.results.intervals.verdict` (met only when the whole interval clears it).
    """
    sign = ">=" if at_least else "<="
    shown = "not measured" if interval.n == 0 else interval.format(scale, digits) + unit
    return (
        f"- {label}: {shown} (n={interval.n}; target {sign} {scale * target:.{digits}f}{unit}): "
        f"**{verdict(interval, target, at_least)}**"
    )


def unfinished(runs: Mapping[str, Mapping[int, Mapping]], seeds: Sequence[int]) -> list[str]:
    """``"<condition> seeds 1 2 (<status>)"`` per condition and status, for the asked seeds that did not complete."""
    lines = []
    for label, by_seed in runs.items():
        by_status: dict[str, list[int]] = {}
        for seed in seeds:
            if not completed(by_seed.get(seed)):
                by_status.setdefault((by_seed.get(seed) or {}).get("status", MISSING), []).append(seed)
        lines += [
            f"{label} seed{'s' if len(which) > 1 else ''} {' '.join(map(str, which))} ({status})"
            for status, which in by_status.items()
        ]
    return lines


def seeds_caption(seeds: Sequence[int]) -> str:
    """The caption clause naming the interval method and the seeds asked for (no leading capital)."""
    return (
        f"{METHOD_CAPTION}, shown as mean ± half-width (n); seeds asked: {' '.join(map(str, seeds))}, "
        "n counts the completed runs."
    )


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m <module> <argv>`` (``sys.argv`` when None) without ``--no-run``: what reproduces the table."""
    given = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *(a for a in given if a != NO_RUN)])


def runs_wall_time_s(records: Iterable[Mapping]) -> float:
    """Sum of the completed runs' own wall time (their ``summary.wall_time_s``: the rounds, not start-up)."""
    return float(sum(r["summary"].get("wall_time_s") or 0.0 for r in records if completed(r)))
