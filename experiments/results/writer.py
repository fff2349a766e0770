"""Per-round records of one run: ``results.json`` and how it is read back.

A run folder holds one ``results.json``::

    {"status": "running" | "completed" | "failed",
     "config": {...},            # the resolved run configuration
     "rounds": [{...}, ...],     # one record per finished round, in round order
     "summary": {...},           # see :func:`experiments.results.summary.summarize`
     "error": null | "..."}

:class:`ResultsWriter` rewrites the whole file atomically after every round (temporary file in
the same folder, flush + fsync, ``os.replace``), so a crash or a kill keeps every finished round
and never leaves half-written JSON. The file is strict JSON: NaN and infinities become ``null``,
numpy scalars and arrays become plain numbers and lists.

The summary lives in :mod:`experiments.results.summary`, the plots in :mod:`experiments.results.plots` and the
terminal progress line in :mod:`experiments.results.progress`; the names they had here are re-exported
below. Plots import matplotlib lazily, so importing this module stays fast.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.results.atomic import write_atomically
from experiments.results.plots import plot_run
from experiments.results.summary import summarize
from experiments.schema import RunConfig, to_dict

RESULTS_FILENAME = "results.json"

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
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


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


def add_to_summary(path_or_dir: str | Path, fields: Mapping[str, Any]) -> None:
    """Merge ``fields`` into the summary of a finished ``results.json``, atomically.

    For facts only the caller of the ServerApp knows once the ServerApp has written the file,
    such as which simulation backend ran the ClientApps (``engine_backend``).
    """
    path = Path(path_or_dir)
    path = path / RESULTS_FILENAME if path.is_dir() else path
    data = load_results(path)
    data["summary"] = {**(data.get("summary") or {}), **to_json_safe(dict(fields))}
    _write_json_atomically(path, data)


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
    rounds
        Round records a resumed run already finished (from its checkpoint); checked like
        :meth:`add_round`'s.

    Notes
    -----
    The file exists from construction on with ``status="running"``, no rounds and the summary
    of no rounds; a run that dies keeps that status and every round it finished.
    """

    def __init__(
        self, run_dir: str | Path, config: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / RESULTS_FILENAME
        kept: list[dict[str, Any]] = []
        for record in rounds:
            clean = to_json_safe(record)
            _check_round_record(clean, kept[-1]["round"] if kept else None)
            kept.append(clean)
        self._data: dict[str, Any] = {
            "status": STATUS_RUNNING,
            "config": to_json_safe(to_dict(config) if isinstance(config, RunConfig) else config),
            "rounds": kept,
            "summary": summarize(kept),
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

