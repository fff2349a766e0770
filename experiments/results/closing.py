"""What a finished run prints for a person: before/after, cost, where the files are, what to try next.

Rendered from the run's ``results.json`` alone (:func:`closing_summary`), so a summary can be
printed again for any run folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments.results.plots import ACCURACY_PLOT_FILENAME, BYTES_PLOT_FILENAME
from experiments.results.progress import format_bytes, format_duration
from experiments.results.summary import finite_or_none

#: The comparison suggested when the run's plug-in names none.
DEFAULT_BASELINE = "algorithm=fedavg"


def _accuracy(value: Any) -> str:
    number = finite_or_none(value)
    return "-" if number is None else f"{number:.3f}"


def _gain(value: Any) -> str:
    number = finite_or_none(value)
    return "-" if number is None else f"{number:+.3f}"


def _rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(label, value, note) rows of the table."""
    rows = []
    if finite_or_none(summary.get("final_pretrained_accuracy")) is not None:
        rows.append(("before: pre-trained model", _accuracy(summary.get("final_pretrained_accuracy")),
                     "the final round's devices, their local test data"))
    rows.append(("after adaptation", _accuracy(summary.get("final_accuracy")), "the same devices"))
    if finite_or_none(summary.get("accuracy_gain")) is not None:
        rows.append(("gain", _gain(summary.get("accuracy_gain")),
                     f"mean over rounds {_gain(summary.get('mean_accuracy_gain'))}"))
    rows.append(("cloud model, global test", _accuracy(summary.get("final_global_accuracy")),
                 f"pre-trained {_accuracy(summary.get('pretrained_global_accuracy'))}"))
    rows.append(("traffic", f"up {format_bytes(summary.get('total_uplink_bytes') or 0)}",
                 f"down {format_bytes(summary.get('total_downlink_bytes') or 0)}"))
    rows.append(("time", f"virtual {format_duration(summary.get('sim_time_s') or 0)}",
                 f"wall {format_duration(summary.get('wall_time_s') or 0)} in rounds"))
    return rows


def next_commands(algorithm: str, baseline: str) -> list[tuple[str, str]]:
    """Commands to try after a run of ``algorithm`` (command, what it shows).

    ``baseline`` holds the overrides of the run to compare against (the plug-in's ``baseline``);
    the seed sweep runs both, so the report can pair them seed by seed.
    """
    return [
        (f"python -m experiments.run {baseline}", "a baseline on the same devices"),
        (f"python -m experiments.run -m {sweep_of(algorithm, baseline)} seed=0,1,2", "a sweep: both, three seeds"),
        ("python -m experiments.report multirun/<date>/<time>", "the sweep's table and plot"),
    ]


def sweep_of(algorithm: str, baseline: str) -> str:
    """Multirun overrides running ``algorithm`` and its ``baseline``.

    ``algorithm=fedavg`` gives ``algorithm=<algorithm>,fedavg``; a baseline that is the same
    algorithm with another ``method`` (``algorithm=x algorithm.x.method=tent``, whose own method
    carries the algorithm's name) sweeps the method: ``algorithm=x algorithm.x.method=x,tent``.
    Any other baseline is suggested as it is.
    """
    parts = baseline.split()
    other = parts[0].removeprefix("algorithm=")
    if len(parts) == 1:
        return f"algorithm={algorithm},{other}"
    key, value = parts[1].split("=", 1)
    return f"algorithm={other} {key}={algorithm},{value}" if other == algorithm and key.endswith(".method") else baseline


def closing_summary(results: Mapping[str, Any], run_dir: str | Path, baseline: str = DEFAULT_BASELINE) -> str:
    """The text printed when a run finishes (module docstring).

    Parameters
    ----------
    results : mapping
        The run's results.json (``config``, ``summary``, ``rounds``).
    run_dir : str or Path
        The run's folder.
    baseline : str
        The overrides of the run to compare against (the algorithm plug-in's ``baseline``).
    """
    config, summary = results.get("config") or {}, results.get("summary") or {}
    algorithm = (config.get("algorithm") or {}).get("name", "?")
    scenario = config.get("scenario") or {}
    fleet = config.get("fleet") or {}
    rows = _rows(summary)
    width = max(len(label) for label, _, _ in rows)
    lines = [
        f"{algorithm} on {(config.get('dataset') or {}).get('name', '?')}: {summary.get('rounds', 0)} rounds, "
        f"{fleet.get('devices', '?')} devices ({fleet.get('per_round', '?')} per round), "
        f"scenario {scenario.get('name', '?')}",
        "",
        *(f"  {label:<{width}}  {value:>10}   {note}" for label, value, note in rows),
        "",
        f"files in {run_dir}: results.json, {ACCURACY_PLOT_FILENAME}, {BYTES_PLOT_FILENAME}",
        "next:",
    ]
    lines += [f"  {command}    # {what}" for command, what in next_commands(algorithm, baseline)]
    return "\n".join(lines)
