"""Before and after adaptation for one run of each algorithm, and the zoo's markdown table.

What "before" means depends on how the algorithm is scored, always on the same data as "after":

- local test sets (ECLM and its baselines): the frozen pre-trained model on the devices' local
  test data, round by round (``pretrained_accuracy``), against ``accuracy``;
- evolving domains (ElasticDNN): the device's model before it adapts to a domain, on that
  domain's held-out batch (``train_accuracy_before``), against ``accuracy`` after adapting;
- online streams (CEMA and the TTA baselines): the ``source`` run's online accuracy, the
  pre-trained model predicting the same seeded batches of the same seeded cohorts, against the
  method's online accuracy.

Local and evolving values are means over the rounds that have both; online values are the
run's cumulative online accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from experiments.results.progress import format_bytes, format_duration
from experiments.results.summary import finite_or_none

#: Round keys of the two measurements: (before, after) per scoring kind.
LOCAL_KEYS = ("pretrained_accuracy", "accuracy")
EVOLVING_KEYS = ("train_accuracy_before", "accuracy")
ONLINE_KEY = "train_online_accuracy"
#: The online run whose accuracy is every online method's "before": the pre-trained model, no adaptation.
ONLINE_SOURCE = "source"


@dataclass(frozen=True)
class ZooRow:
    """One algorithm's run: where, on what, before and after, and what it cost."""

    algorithm: str
    status: str
    scenario: str
    network: str
    before: float | None
    after: float | None
    before_is: str
    bytes_total: float
    sim_time_s: float
    wall_time_s: float

    @property
    def gain(self) -> float | None:
        """``after - before`` (None when either is missing)."""
        if self.before is None or self.after is None:
            return None
        return self.after - self.before


def _mean_over_rounds(rounds: Sequence[Mapping[str, Any]], keys: tuple[str, str]) -> tuple[float | None, float | None]:
    """Means of the two keys over the rounds that have both (None, None when none has)."""
    pairs = [(finite_or_none(r.get(keys[0])), finite_or_none(r.get(keys[1]))) for r in rounds]
    pairs = [(b, a) for b, a in pairs if b is not None and a is not None]
    if not pairs:
        return None, None
    return sum(b for b, _ in pairs) / len(pairs), sum(a for _, a in pairs) / len(pairs)


def _online_accuracy(results: Mapping[str, Any] | None) -> float | None:
    """The run's final cumulative online accuracy (None without one)."""
    rounds = (results or {}).get("rounds") or []
    values = [finite_or_none(r.get(ONLINE_KEY)) for r in rounds]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def before_and_after(results: Mapping[str, Any], source: Mapping[str, Any] | None) -> tuple[float | None, float | None, str]:
    """(before, after, what "before" is) for one run; ``source`` is the online ``source`` run."""
    rounds = results.get("rounds") or []
    before, after = _mean_over_rounds(rounds, LOCAL_KEYS)
    if before is not None:
        return before, after, "pre-trained model, same local tests"
    before, after = _mean_over_rounds(rounds, EVOLVING_KEYS)
    if before is not None:
        return before, after, "before adapting to the domain, same held-out batch"
    after = _online_accuracy(results)
    if after is not None:
        return _online_accuracy(source), after, "source model, same stream batches"
    summary = results.get("summary") or {}
    return None, finite_or_none(summary.get("final_accuracy")), "-"


def zoo_row(name: str, results: Mapping[str, Any], source: Mapping[str, Any] | None) -> ZooRow:
    """The table row of algorithm ``name``'s run."""
    config, summary = results.get("config") or {}, results.get("summary") or {}
    before, after, before_is = before_and_after(results, source)
    return ZooRow(
        algorithm=name,
        status=str(results.get("status", "missing")),
        scenario=str((config.get("scenario") or {}).get("name", "-")),
        network=str((config.get("model") or {}).get("name", "-")),
        before=before,
        after=after,
        before_is=before_is,
        bytes_total=float((summary.get("total_uplink_bytes") or 0) + (summary.get("total_downlink_bytes") or 0)),
        sim_time_s=float(summary.get("sim_time_s") or 0.0),
        wall_time_s=float(summary.get("wall_time_s") or 0.0),
    )


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def markdown_table(rows: Sequence[ZooRow], reasons: Mapping[str, str]) -> str:
    """The zoo table; a row whose gain is negative carries ``reasons[algorithm]`` (or says it has none)."""
    lines = [
        "| algorithm | scenario | network | before (%) | after (%) | gain | before is | traffic | virtual time | wall time | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        note = ""
        if row.status != "completed":
            note = f"run {row.status}"
        elif row.gain is not None and row.gain < 0:
            note = reasons.get(row.algorithm, "adaptation hurt here; no reason is known")
        lines.append(
            f"| `{row.algorithm}` | {row.scenario} | {row.network} | {_percent(row.before)} | {_percent(row.after)} | "
            f"{_percent(row.gain, signed=True)} | {row.before_is} | {format_bytes(row.bytes_total)} | "
            f"{format_duration(row.sim_time_s)} | {format_duration(row.wall_time_s)} | {note} |"
        )
    return "\n".join(lines)
