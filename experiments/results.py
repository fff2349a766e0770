"""Per-round records of one run: ``results.json``, its summary, plots and a progress line.

A run folder holds one ``results.json``::

    {"status": "running" | "completed" | "failed",
     "config": {...},            # the resolved run configuration
     "rounds": [{...}, ...],     # one record per finished round, in round order
     "summary": {...},           # see :func:`summarize`
     "error": null | "..."}

:class:`ResultsWriter` rewrites the whole file atomically after every round (temporary file in
the same folder, flush + fsync, ``os.replace``), so a crash or a kill keeps every finished round
and never leaves half-written JSON. The file is strict JSON: NaN and infinities become ``null``,
numpy scalars and arrays become plain numbers and lists.

Plots use matplotlib's Agg backend, imported lazily so that importing this module stays fast.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

RESULTS_FILENAME = "results.json"
ACCURACY_PLOT_FILENAME = "accuracy_per_round.png"
BYTES_PLOT_FILENAME = "accuracy_vs_bytes.png"

# The round record: every round carries at least these keys.
REQUIRED_ROUND_KEYS = (
    "round",
    "accuracy",
    "global_accuracy",
    "uplink_bytes",
    "downlink_bytes",
    "sim_time_s",
    "wall_time_s",
    "clients",
    "failures",
)
# Keys that must hold a non-negative number (or null, e.g. a NaN that was measured).
NON_NEGATIVE_ROUND_KEYS = ("uplink_bytes", "downlink_bytes", "sim_time_s", "wall_time_s")
ACCURACY_ROUND_KEYS = ("accuracy", "global_accuracy")

STATUS_RUNNING = "running"
FINAL_STATUSES = ("completed", "failed")

BYTE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")  # SI decimal prefixes (1 kB = 1000 B)
BYTE_UNIT_STEP = 1000.0
PLOT_FIGSIZE_IN = (6.0, 4.0)  # one panel, readable in a README at 100 dpi
PLOT_DPI = 100


# --------------------------------------------------------------------------- JSON helpers
def to_json_safe(value: Any) -> Any:
    """Convert ``value`` into plain, strict-JSON data.

    Parameters
    ----------
    value
        Mappings, sequences, dataclass instances, enums, paths, numpy / torch scalars and arrays
        (anything with ``tolist()``), and plain Python scalars.

    Returns
    -------
    Any
        Dicts with string keys, lists, str, int, float, bool or None. NaN and infinities become
        None, so ``json.dumps(..., allow_nan=False)`` always succeeds.

    Raises
    ------
    ValueError
        If a value has a type that JSON cannot represent.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_safe(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return to_json_safe(value.value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars/arrays, torch tensors
        return to_json_safe(value.tolist())
    if isinstance(value, (set, frozenset)) or (
        isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray))
    ):  # lists, tuples, OmegaConf ListConfig
        return [to_json_safe(item) for item in value]
    raise ValueError(
        f"cannot store {value!r} (type {type(value).__name__}) in results.json; "
        "pass numbers, strings, lists or dicts"
    )


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON; readers see the old or the new file, never a mix."""
    text = json.dumps(data, allow_nan=False, indent=2)
    handle = tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, encoding="utf-8"
    )
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX); silently skipped where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_results(path_or_dir: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` written by :class:`ResultsWriter`.

    Parameters
    ----------
    path_or_dir
        The file itself or the run folder that contains it.

    Returns
    -------
    dict
        The parsed file with at least ``status``, ``config``, ``rounds``.

    Raises
    ------
    ValueError
        If the file is missing, not valid JSON, or lacks the keys above.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / RESULTS_FILENAME
    if not path.is_file():
        raise ValueError(f"no {RESULTS_FILENAME} at {path}; pass a run folder written by ResultsWriter")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it or re-run the experiment") from error
    missing = [key for key in ("status", "config", "rounds") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; it was not written by ResultsWriter")
    return data


# --------------------------------------------------------------------------- summary
def _finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _sum_finite(rounds: Sequence[Mapping[str, Any]], key: str) -> float | int:
    """Sum of ``key`` over rounds, skipping missing/NaN entries; ints stay ints."""
    values = [record.get(key) for record in rounds]
    kept = [value for value in values if _finite(value) is not None]
    return sum(kept)


def summarize(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary of a run's round records.

    Parameters
    ----------
    rounds
        Round records in round order (see :data:`REQUIRED_ROUND_KEYS`).

    Returns
    -------
    dict
        ``final_accuracy`` (last non-null ``accuracy``), ``best_accuracy`` (max non-null),
        ``final_global_accuracy`` / ``best_global_accuracy`` (the same for ``global_accuracy``),
        ``total_uplink_bytes`` / ``total_downlink_bytes`` (sums), ``sim_time_s`` /
        ``wall_time_s`` (sums of the per-round times) and ``rounds`` (count). A round whose
        accuracy is null (no device evaluated) is skipped, never an error; with no accuracy at
        all the accuracy fields are None.
    """
    summary: dict[str, Any] = {}
    for key, prefix in (("accuracy", ""), ("global_accuracy", "global_")):
        values = [_finite(record.get(key)) for record in rounds]
        values = [value for value in values if value is not None]
        summary[f"final_{prefix}accuracy"] = values[-1] if values else None
        summary[f"best_{prefix}accuracy"] = max(values) if values else None
    summary["total_uplink_bytes"] = _sum_finite(rounds, "uplink_bytes")
    summary["total_downlink_bytes"] = _sum_finite(rounds, "downlink_bytes")
    summary["sim_time_s"] = _sum_finite(rounds, "sim_time_s")
    summary["wall_time_s"] = _sum_finite(rounds, "wall_time_s")
    summary["rounds"] = len(rounds)
    return summary


# --------------------------------------------------------------------------- validation
def _check_round_record(record: Mapping[str, Any], last_round: int | None) -> None:
    """Raise ValueError unless ``record`` is a complete round record following ``last_round``."""
    missing = [key for key in REQUIRED_ROUND_KEYS if key not in record]
    if missing:
        raise ValueError(
            f"round record lacks the keys {missing}; every round needs {list(REQUIRED_ROUND_KEYS)}"
        )
    number = record["round"]
    if isinstance(number, bool) or not isinstance(number, int):
        raise ValueError(f"round number must be an integer, got {number!r}")
    if last_round is not None and number <= last_round:
        raise ValueError(
            f"round numbers must strictly increase: got round {number} after round {last_round}"
        )
    for key in NON_NEGATIVE_ROUND_KEYS + ACCURACY_ROUND_KEYS:
        value = record[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"round field {key!r} must be a number or null, got {value!r}")
    for key in NON_NEGATIVE_ROUND_KEYS:
        if record[key] is not None and record[key] < 0:
            raise ValueError(f"round field {key!r} must be >= 0, got {record[key]!r}")


# --------------------------------------------------------------------------- writer
class ResultsWriter:
    """Owns ``<run_dir>/results.json`` and rewrites it atomically after every round.

    Parameters
    ----------
    run_dir
        The run folder (created if missing). An existing ``results.json`` there is replaced.
    config
        The resolved run configuration (a mapping or a config dataclass such as ``RunConfig``).

    Notes
    -----
    The file exists from construction on with ``status="running"``, no rounds and the summary
    of no rounds; a run that dies keeps that status and every round it finished.
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / RESULTS_FILENAME
        self._data: dict[str, Any] = {
            "status": STATUS_RUNNING,
            "config": to_json_safe(config),
            "rounds": [],
            "summary": summarize([]),
            "error": None,
        }
        self._write()

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """Copies of the round records written so far, in round order."""
        return copy.deepcopy(self._data["rounds"])

    def add_round(self, record: Mapping[str, Any]) -> None:
        """Append one finished round, recompute the summary and rewrite the file.

        Parameters
        ----------
        record
            A mapping with at least :data:`REQUIRED_ROUND_KEYS`; extra keys are kept. NaN and
            infinities are stored as null.

        Raises
        ------
        ValueError
            If keys are missing, the round number does not exceed the previous one, a numeric
            field is not a number, or the writer has already finished.
        """
        self._check_running()
        if not isinstance(record, Mapping):
            raise ValueError(f"a round record must be a mapping, got {type(record).__name__}")
        clean = to_json_safe(record)
        rounds = self._data["rounds"]
        _check_round_record(clean, rounds[-1]["round"] if rounds else None)
        rounds.append(clean)
        self._data["summary"] = summarize(rounds)
        self._write()

    def finish(
        self,
        status: str = "completed",
        error: str | None = None,
        extra_summary: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Mark the run as finished, write the file and, if any round finished, the plots.

        Parameters
        ----------
        status
            ``"completed"`` or ``"failed"``.
        error
            What went wrong (for a failed run), stored under ``error``.
        extra_summary
            More summary fields (e.g. pre-training accuracy), merged into ``summary``.

        Returns
        -------
        dict
            The final content of ``results.json``.
        """
        self._check_running()
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
        summary = summarize(self._data["rounds"])
        summary.update(to_json_safe(dict(extra_summary or {})))
        self._data.update(status=status, error=None if error is None else str(error), summary=summary)
        self._write()
        if self._data["rounds"]:
            plot_run(self._data["rounds"], self.run_dir)
        return copy.deepcopy(self._data)

    def _check_running(self) -> None:
        if self._data["status"] != STATUS_RUNNING:
            raise ValueError(
                f"{self.path} is already {self._data['status']}; create a new ResultsWriter for a new run"
            )

    def _write(self) -> None:
        _write_json_atomically(self.path, self._data)


# --------------------------------------------------------------------------- plots
def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = PLOT_FIGSIZE_IN):
    """A matplotlib Figure on the Agg backend (no display, no pyplot global state).

    Returns
    -------
    tuple
        ``(figure, axes)`` as from ``Figure.subplots``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=PLOT_DPI)
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def integer_axis_locator():
    """A tick locator that puts ticks on whole numbers only (round axes)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def bytes_axis_formatter():
    """A tick formatter that prints byte counts with :func:`format_bytes`."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _position: format_bytes(max(value, 0.0)))


def cumulative_bytes(rounds: Sequence[Mapping[str, Any]]) -> list[float]:
    """Uplink + downlink bytes summed up to and including each round (null counts as 0)."""
    total, running = [], 0.0
    for record in rounds:
        for key in ("uplink_bytes", "downlink_bytes"):
            running += _finite(record.get(key)) or 0.0
        total.append(running)
    return total


def _accuracy_series(rounds: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """``key`` per round with null as NaN (matplotlib draws a gap)."""
    values = [_finite(record.get(key)) for record in rounds]
    return [math.nan if value is None else value for value in values]


def plot_run(rounds: Sequence[Mapping[str, Any]], run_dir: str | Path) -> list[Path]:
    """Write ``accuracy_per_round.png`` and ``accuracy_vs_bytes.png`` into ``run_dir``.

    Parameters
    ----------
    rounds
        Round records (device ``accuracy`` and cloud ``global_accuracy`` are both drawn).
    run_dir
        Destination folder.

    Returns
    -------
    list of Path
        The two PNG files.
    """
    run_dir = Path(run_dir)
    numbers = [record["round"] for record in rounds]
    x_by_plot = {ACCURACY_PLOT_FILENAME: numbers, BYTES_PLOT_FILENAME: cumulative_bytes(rounds)}
    written = []
    for filename, xs in x_by_plot.items():
        figure, axes = new_figure()
        axis = axes[0][0]
        for key, label in (("accuracy", "device accuracy"), ("global_accuracy", "global accuracy")):
            axis.plot(xs, _accuracy_series(rounds, key), marker="o", markersize=3, label=label)
        if filename == BYTES_PLOT_FILENAME:
            axis.xaxis.set_major_formatter(bytes_axis_formatter())
            axis.set_xlabel("cumulative bytes (uplink + downlink)")
        else:
            axis.xaxis.set_major_locator(integer_axis_locator())
            axis.set_xlabel("round")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(run_dir / filename)
        written.append(run_dir / filename)
    return written


# --------------------------------------------------------------------------- terminal
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
    number = _finite(value)
    return "-" if number is None else f"{number:.3f}"


class ProgressLine:
    """One terminal line per finished round.

    Example: ``round 3/10  acc 0.812  global 0.790  up 1.2 MB  down 3.4 MB  virtual 12.3 s
    wall 4.5 s  ETA 30 s``. ``up``, ``down``, ``virtual`` and ``wall`` are running totals over
    the rounds seen so far; ETA = mean wall time per seen round x rounds left
    (``total_rounds - round``).

    Parameters
    ----------
    total_rounds
        Rounds the run will do (> 0).
    stream
        Where lines go; None means ``sys.stdout`` at the time of each update.
    """

    def __init__(self, total_rounds: int, stream: TextIO | None = None) -> None:
        if isinstance(total_rounds, bool) or not isinstance(total_rounds, int) or total_rounds < 1:
            raise ValueError(f"total_rounds must be a positive integer, got {total_rounds!r}")
        self.total_rounds = total_rounds
        self.stream = stream
        self._seen: list[Mapping[str, Any]] = []

    def update(self, record: Mapping[str, Any]) -> str:
        """Print the line for ``record`` (a round record) and return it."""
        self._seen.append(record)
        totals = summarize(self._seen)
        walls = [_finite(seen.get("wall_time_s")) for seen in self._seen]
        walls = [wall for wall in walls if wall is not None]
        rounds_left = max(self.total_rounds - int(record["round"]), 0)
        eta = format_duration(sum(walls) / len(walls) * rounds_left) if walls else "?"
        line = (
            f"round {record['round']}/{self.total_rounds}"
            f"  acc {_format_accuracy(record.get('accuracy'))}"
            f"  global {_format_accuracy(record.get('global_accuracy'))}"
            f"  up {format_bytes(totals['total_uplink_bytes'])}"
            f"  down {format_bytes(totals['total_downlink_bytes'])}"
            f"  virtual {totals['sim_time_s']:.1f} s"
            f"  wall {totals['wall_time_s']:.1f} s"
            f"  ETA {eta}"
        )
        print(line, file=self.stream or sys.stdout, flush=True)
        return line
