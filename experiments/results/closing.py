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

#: Baseline to suggest beside each algorithm: FedAvg for the collaborative methods, doing
#: nothing (NA, ECLM 7.1's lower bound) for FedAvg itself, the source model for online methods.
BASELINE_FOR = {"fedavg": "none"}
DEFAULT_BASELINE = "fedavg"
ONLINE_BASELINE = "source"


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


def next_commands(algorithm: str, online: bool) -> list[tuple[str, str]]:
    """Two or three commands to try after a run of ``algorithm`` (command, what it shows)."""
    baseline = ONLINE_BASELINE if online else BASELINE_FOR.get(algorithm, DEFAULT_BASELINE)
    scenario = " scenario=online" if online else ""
    return [
        (f"python -m experiments.run algorithm={baseline}{scenario}", "a baseline on the same devices"),
        (f"python -m experiments.run -m algorithm={algorithm},{baseline}{scenario} seed=0,1,2",
         "a sweep: both methods, three seeds"),
        ("python -m experiments.report multirun/<date>/<time>", "the sweep's table and plot"),
    ]


def closing_summary(results: Mapping[str, Any], run_dir: str | Path) -> str:
    """The text printed when a run finishes (module docstring).

    Parameters
    ----------
    results : mapping
        The run's results.json (``config``, ``summary``, ``rounds``).
    run_dir : str or Path
        The run's folder.
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
    online = finite_or_none(summary.get("final_pretrained_accuracy")) is None and scenario.get("name") == "online"
    lines += [f"  {command}    # {what}" for command, what in next_commands(algorithm, online)]
    return "\n".join(lines)
