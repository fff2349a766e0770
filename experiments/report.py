"""Compare runs: a run or multirun folder -> a markdown table and a comparison plot.

Usage::

    python -m experiments.report DIR [--out FILE.md]

``DIR`` is one run folder (it holds ``results.json``) or a multirun folder (every
``results.json`` below it counts). Runs whose configs match once ``seed`` and volatile keys
(:data:`IGNORED_KEYS`) are dropped form a group; each table row is a group, labelled by the
config keys that differ between groups (``algorithm.name=fedavg``), with ``n`` (its completed
runs, i.e. seeds) and the final and best accuracy as mean ± half-width of the two-sided 95 %
Student-t interval over those runs (``mean +- t_{0.975, n-1} * s / sqrt(n)``, ``s`` with
``ddof=1``; :mod:`experiments.results.intervals`); a single run shows its value alone (no
interval). The table's caption states the method. Failed and unfinished runs are listed below
the table, never averaged in. The plot shades the same per-round interval around each mean.

Writes ``report.md`` and ``report.png`` into ``DIR`` (or ``FILE.md`` and ``FILE.png`` with
``--out``) and prints the markdown. Exit code 2 when there is nothing to report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.results.intervals import METHOD_CAPTION, mean_interval
from experiments.results.plots import bytes_axis_formatter, cumulative_bytes, integer_axis_locator, new_figure
from experiments.results.progress import format_bytes
from experiments.results.summary import summarize
from experiments.results.writer import RESULTS_FILENAME, load_results

REPORT_MARKDOWN = "report.md"
REPORT_PLOT = "report.png"
EXIT_NOTHING_TO_REPORT = 2  # same code argparse uses for bad command lines
ACCURACY_DIGITS = 3  # accuracies are fractions; three decimals show a tenth of a point
# Dotted config keys (and everything below them) that do not define an experimental condition:
# the seed (averaged over), Ray/engine resources, cache and data folders, Hydra bookkeeping.
IGNORED_KEYS = ("seed", "engine", "pretrain.cache_dir", "dataset.root", "hydra", "output_dir", "run_dir")
# Label used when all runs share one condition, so a single run still names its algorithm.
FALLBACK_LABEL_KEYS = ("algorithm.name",)
PLOT_FIGSIZE_IN = (12.0, 4.5)  # two panels side by side
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"


# --------------------------------------------------------------------------- collecting
def collect(directory: str | Path) -> list[dict[str, Any]]:
    """Load every run below ``directory``.

    Parameters
    ----------
    directory
        A run folder (holding ``results.json``) or a multirun folder searched recursively.

    Returns
    -------
    list of dict
        Parsed ``results.json`` contents in path order, each with an added ``run_dir`` (str).
        Empty when no ``results.json`` exists.

    Raises
    ------
    ValueError
        If ``directory`` is not a folder or a ``results.json`` is invalid.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass a run or multirun folder")
    direct = folder / RESULTS_FILENAME
    paths = [direct] if direct.is_file() else sorted(folder.rglob(RESULTS_FILENAME))
    runs = []
    for path in paths:
        run = load_results(path)
        run["run_dir"] = str(path.parent)
        runs.append(run)
    return runs


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"algorithm.name": "fedavg", ...}``; empty mappings stay as ``{}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _is_ignored(key: str, ignored_keys: Sequence[str]) -> bool:
    return any(key == ignored or key.startswith(f"{ignored}.") for ignored in ignored_keys)


def _condition(run: Mapping[str, Any], ignored_keys: Sequence[str]) -> dict[str, Any]:
    """The run's flattened config without seed and volatile keys."""
    flat = flatten_config(run.get("config") or {})
    return {key: value for key, value in flat.items() if not _is_ignored(key, ignored_keys)}


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


# --------------------------------------------------------------------------- grouping
def _differing_keys(conditions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose value (or presence) is not the same in every condition."""
    keys = sorted({key for condition in conditions for key in condition})
    return [
        key
        for key in keys
        if len({(key in c, json.dumps(c.get(key), sort_keys=True)) for c in conditions}) > 1
    ]


def _label(condition: Mapping[str, Any], differing: Sequence[str]) -> str:
    keys = list(differing) or [key for key in FALLBACK_LABEL_KEYS if key in condition]
    if not keys:
        return "all runs"
    texts = [_value_text(condition[key]) if key in condition else "<unset>" for key in keys]
    return ", ".join(f"{key}={text}" for key, text in zip(keys, texts))


def group_runs(
    results: Sequence[Mapping[str, Any]], ignored_keys: Sequence[str] = IGNORED_KEYS
) -> dict[str, list[dict[str, Any]]]:
    """Group runs that differ only in seed (and :data:`IGNORED_KEYS`).

    Parameters
    ----------
    results
        Runs as returned by :func:`collect` (any status).
    ignored_keys
        Dotted config keys (with everything below them) left out of the comparison.

    Returns
    -------
    dict
        Label -> runs, labels sorted. A label lists the config keys that differ between groups,
        e.g. ``"algorithm.name=fedavg"``; with a single group it falls back to
        :data:`FALLBACK_LABEL_KEYS`, or ``"all runs"``.
    """
    by_identity: dict[str, list[dict[str, Any]]] = {}
    conditions: dict[str, dict[str, Any]] = {}
    for run in results:
        condition = _condition(run, ignored_keys)
        identity = json.dumps(condition, sort_keys=True)
        conditions[identity] = condition
        by_identity.setdefault(identity, []).append(dict(run))
    differing = _differing_keys(list(conditions.values()))
    groups = {_label(conditions[identity], differing): runs for identity, runs in by_identity.items()}
    return dict(sorted(groups.items()))


# --------------------------------------------------------------------------- table
def run_summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """The run's stored summary, completed from its rounds where a field is missing."""
    return {**summarize(run.get("rounds") or []), **(run.get("summary") or {})}


def _finite_values(runs: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    values = [run_summary(run).get(key) for run in runs]
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _interval_text(values: Sequence[float]) -> str:
    """``"0.850 ± 0.635"``: mean ± 95 % half-width; the value alone for one run, ``-`` for none."""
    return mean_interval(values).format(digits=ACCURACY_DIGITS)


def _mean_text(values: Sequence[float], formatter) -> str:
    return formatter(float(np.mean(values))) if values else "-"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _table_row(label: str, runs: Sequence[Mapping[str, Any]]) -> str:
    done = [run for run in runs if run.get("status") == STATUS_COMPLETED]
    cells = [
        _escape(label),
        str(len(done)),
        _interval_text(_finite_values(done, "final_accuracy")),
        _interval_text(_finite_values(done, "best_accuracy")),
        _mean_text(_finite_values(done, "total_uplink_bytes"), format_bytes),
        _mean_text(_finite_values(done, "total_downlink_bytes"), format_bytes),
        _mean_text(_finite_values(done, "sim_time_s"), lambda s: f"{s:.1f}"),
        _mean_text(_finite_values(done, "wall_time_s"), lambda s: f"{s:.1f}"),
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| config | n | final accuracy (mean ± 95 % CI) | best accuracy (mean ± 95 % CI) "
    "| total uplink (mean) | total downlink (mean) | virtual time s (mean) | wall time s (mean) |"
)
#: The sentence above the table: what n is and how the interval is computed.
TABLE_CAPTION = (
    f"Accuracy cells: {METHOD_CAPTION}, shown as mean ± half-width; n = completed runs (seeds) of the row; "
    "a row with one run shows its value alone."
)


def _last_line(text: Any) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


def _problem_runs(groups: Mapping[str, Sequence[Mapping[str, Any]]], status: str | None) -> list[str]:
    """Bullet lines for runs with ``status`` (None: neither completed nor failed)."""
    lines = []
    for label, runs in groups.items():
        for run in runs:
            run_status = run.get("status")
            if status is None and run_status in (STATUS_COMPLETED, STATUS_FAILED):
                continue
            if status is not None and run_status != status:
                continue
            seed = (run.get("config") or {}).get("seed", "?")
            where = f"`{run.get('run_dir', '?')}` ({_escape(label)}, seed={seed})"
            detail = (
                _last_line(run.get("error"))
                if status == STATUS_FAILED
                else f"status {run_status}, {len(run.get('rounds') or [])} rounds recorded"
            )
            lines.append(f"- {where}: {detail}")
    return lines


def markdown_table(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown table of the groups, with failed and unfinished runs listed below it.

    Parameters
    ----------
    groups
        Label -> runs, as from :func:`group_runs`.

    Returns
    -------
    str
        :data:`TABLE_CAPTION`, then one row per group: n (completed runs), final and best
        accuracy (mean ± half-width of the 95 % Student-t interval over seeds, ``ddof=1``),
        mean total uplink / downlink (SI bytes), mean virtual and wall time in seconds. Failed
        runs (with the last line of their error) and unfinished runs (status ``running``: still
        going or killed) follow in their own lists.
    """
    separator = "|" + "|".join("---" for _ in range(TABLE_HEADER.count("|") - 1)) + "|"
    lines = [TABLE_CAPTION, "", TABLE_HEADER, separator] + [_table_row(label, runs) for label, runs in groups.items()]
    for title, status in (("Failed runs", STATUS_FAILED), ("Unfinished runs", None)):
        problems = _problem_runs(groups, status)
        if problems:
            lines += ["", f"**{title}**", ""] + problems
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot
def group_curves(runs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-round mean and 95 % interval of accuracy, and mean cumulative bytes, over a group's completed runs.

    Returns
    -------
    dict
        ``round``, ``accuracy_mean``, ``accuracy_low`` / ``accuracy_high`` (the two-sided 95 %
        Student-t interval of :func:`experiments.results.intervals.mean_interval`; NaN where
        fewer than two runs have an accuracy) and ``bytes_mean`` (uplink + downlink so far),
        aligned by round number.
    """
    accuracy: dict[int, list[float]] = {}
    spent: dict[int, list[float]] = {}
    for run in runs:
        if run.get("status") != STATUS_COMPLETED:
            continue
        rounds = run.get("rounds") or []
        for record, total in zip(rounds, cumulative_bytes(rounds)):
            spent.setdefault(record["round"], []).append(total)
            value = record.get("accuracy")
            if value is not None and math.isfinite(float(value)):
                accuracy.setdefault(record["round"], []).append(float(value))
    numbers = sorted(spent)
    intervals = [mean_interval(accuracy.get(n, [])) for n in numbers]
    return {
        "round": np.array(numbers, dtype=float),
        "accuracy_mean": np.array([i.mean for i in intervals]),
        "accuracy_low": np.array([i.low for i in intervals]),
        "accuracy_high": np.array([i.high for i in intervals]),
        "bytes_mean": np.array([float(np.mean(spent[n])) for n in numbers]),
    }


def plot_groups(groups: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Write the comparison plot: accuracy per round and accuracy vs cumulative bytes.

    One line per group (mean over seeds) with its 95 % interval shaded around it (none for one run).
    """
    figure, axes = new_figure(1, 2, figsize=PLOT_FIGSIZE_IN)
    by_round, by_bytes = axes[0]
    for label, runs in groups.items():
        curves = group_curves(runs)
        if not len(curves["round"]):
            continue
        low, high = curves["accuracy_low"], curves["accuracy_high"]
        for axis, xs in ((by_round, curves["round"]), (by_bytes, curves["bytes_mean"])):
            (line,) = axis.plot(xs, curves["accuracy_mean"], marker="o", markersize=3, label=label)
            axis.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
    by_round.set_xlabel("round")
    by_round.xaxis.set_major_locator(integer_axis_locator())
    by_bytes.set_xlabel("cumulative bytes (uplink + downlink)")
    by_bytes.xaxis.set_major_formatter(bytes_axis_formatter())
    for axis in (by_round, by_bytes):
        axis.set_ylabel("accuracy (mean, 95 % interval over seeds)")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


# --------------------------------------------------------------------------- command line
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Turn a run or multirun folder into a markdown table and a comparison plot.",
    )
    parser.add_argument("directory", help="a run folder (with results.json) or a multirun folder")
    parser.add_argument("--out", default=None, help="markdown file to write (plot goes beside it as .png)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (0 ok, 2 nothing to report)."""
    args = _parse_args(argv)
    try:
        runs = collect(args.directory)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOTHING_TO_REPORT
    if not runs:
        print(
            f"error: no {RESULTS_FILENAME} found under {args.directory}; "
            "pass a run or multirun folder written by experiments.run",
            file=sys.stderr,
        )
        return EXIT_NOTHING_TO_REPORT
    markdown_path = Path(args.out) if args.out else Path(args.directory) / REPORT_MARKDOWN
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    markdown = markdown_table(groups)
    markdown_path.write_text(markdown, encoding="utf-8")
    plot_groups(groups, markdown_path.with_suffix(".png") if args.out else markdown_path.parent / REPORT_PLOT)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
