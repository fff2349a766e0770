"""The summary of a run's round records (final / best accuracy, byte and time totals).

Shared by the results file (:mod:`experiments.results.writer`), the terminal progress line
(:mod:`experiments.results.progress`) and the plots (:mod:`experiments.results.plots`); it imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _sum_finite(rounds: Sequence[Mapping[str, Any]], key: str) -> float | int:
    """Sum of ``key`` over rounds, skipping missing/NaN entries; ints stay ints."""
    values = [record.get(key) for record in rounds]
    kept = [value for value in values if finite_or_none(value) is not None]
    return sum(kept)


def summarize(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary of a run's round records.

    Parameters
    ----------
    rounds
        Round records in round order (see :data:`experiments.results.writer.REQUIRED_ROUND_KEYS`).

    Returns
    -------
    dict
        ``final_accuracy`` (last non-null ``accuracy``), ``best_accuracy`` (max non-null),
        ``final_global_accuracy`` / ``best_global_accuracy`` (the same for ``global_accuracy``),
        ``total_uplink_bytes`` / ``total_downlink_bytes`` (sums), ``sim_time_s`` /
        ``wall_time_s`` (sums of the per-round times) and ``rounds`` (count). A round whose
        accuracy is null (no device evaluated) is skipped, never an error; with no accuracy at
        all the accuracy fields are None. Before and after: ``final_pretrained_accuracy`` (the
        pre-trained model on the final accuracy's cohort), ``accuracy_gain`` (final accuracy
        minus it) and ``mean_accuracy_gain`` (over the rounds that have both), None without
        ``pretrained_accuracy`` records.
    """
    summary: dict[str, Any] = {}
    for key, prefix in (("accuracy", ""), ("global_accuracy", "global_")):
        values = [finite_or_none(record.get(key)) for record in rounds]
        values = [value for value in values if value is not None]
        summary[f"final_{prefix}accuracy"] = values[-1] if values else None
        summary[f"best_{prefix}accuracy"] = max(values) if values else None
    summary.update(_before_and_after(rounds))
    summary["total_uplink_bytes"] = _sum_finite(rounds, "uplink_bytes")
    summary["total_downlink_bytes"] = _sum_finite(rounds, "downlink_bytes")
    summary["sim_time_s"] = _sum_finite(rounds, "sim_time_s")
    summary["wall_time_s"] = _sum_finite(rounds, "wall_time_s")
    summary["rounds"] = len(rounds)
    return summary


def _before_and_after(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The pre-trained model's accuracy beside the adapted one's (see :func:`summarize`)."""
    pairs = [(finite_or_none(r.get("accuracy")), finite_or_none(r.get("pretrained_accuracy"))) for r in rounds]
    pairs = [(after, before) for after, before in pairs if after is not None]
    final_before = pairs[-1][1] if pairs else None
    gains = [after - before for after, before in pairs if before is not None]
    return {
        "final_pretrained_accuracy": final_before,
        "accuracy_gain": None if final_before is None else pairs[-1][0] - final_before,
        "mean_accuracy_gain": sum(gains) / len(gains) if gains else None,
    }
