"""Where the ElasticDNN claims' runs live, and one number per run and seed from their results.json.

A run of the preset (:mod:`experiments.claims.elastic`) is one method at one seed in
``<out>/sev<severity>/<label>/seed<seed>``; its round r holds every device's r-th domain, each
metric a mean over the devices (the devices' reply metrics, ``train_`` + name). :func:`method_row`
averages a completed run over its domains; :func:`seed_values` lines those numbers up seed by seed
(NaN where a seed's run did not complete), so paired differences can be taken.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments.claims.seeds import per_seed, seed_dir
from models.elastic.footprint import PART_METRIC, PARTS, PEAK_METRIC, RESIDENT_METRIC

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in experiments/<package>/)
#: Where the preset keeps its runs, reports and pre-training cache, and the severity it runs at
#: (the suite's strongest corruption level, the setting of the preset's table).
DEFAULT_OUT = ROOT / "outputs" / "claims_elastic"
DEFAULT_SEVERITY = 5
#: Round-record prefix of the devices' reply metrics (strategies.base.TRAIN_PREFIX).
TRAIN = "train_"


def severity_folder(out: Path, severity: int) -> Path:
    """``<out>/sev<severity>``: every run and report at one corruption severity."""
    return Path(out) / f"sev{severity}"


def run_folder(out: Path, severity: int, label: str, seed: int) -> Path:
    """The folder of one run: ``<out>/sev<severity>/<label>/seed<seed>``."""
    return seed_dir(severity_folder(out, severity) / label, seed)


def multiapp_path(out: Path, severity: int, seed: int) -> Path:
    """The cached multi-app report of one seed: ``<out>/sev<severity>/multiapp/seed<seed>/report.json``."""
    return seed_dir(severity_folder(out, severity) / "multiapp", seed) / "report.json"


def _series(results: Mapping, key: str, fallback: str | None = None) -> list[float]:
    """``key`` (else ``fallback``) of every round record (NaN where missing)."""
    values = [r.get(key, r.get(fallback) if fallback else None) for r in results.get("rounds", [])]
    return [math.nan if v is None else float(v) for v in values]


def _mean(values: Sequence[float]) -> float:
    """Mean without the NaN entries (NaN, silently, when all are)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if len(values) else math.nan


def domain_curve(results: Mapping) -> list[float]:
    """Accuracy after adaptation per domain index: round r holds every device's r-th domain (mean over devices).

    The round record's ``accuracy`` (the cohort's replies; ``train_accuracy`` where a strategy
    keeps the train prefix).
    """
    return _series(results, TRAIN + "accuracy", "accuracy")


#: method_row keys -> the round-record metric they average (memory: every part, resident, peak).
ROUND_METRICS = {
    "accuracy_before": "accuracy_before",
    "wall_s": "adapt_wall_s",
    "flops": "adapt_flops",
    "model_fraction": "model_fraction",
    "resident_bytes": RESIDENT_METRIC,
    "peak_bytes": PEAK_METRIC,
    **{f"{part}_bytes": PART_METRIC.format(part) for part in PARTS},
}


def method_row(results: Mapping) -> dict[str, float] | None:
    """Means over the run's domains of one method (None unless the run completed).

    Keys: ``accuracy`` (after adaptation), then those of :data:`ROUND_METRICS` (``wall_s``: the
    adaptation's wall time, ``flops``: the FLOPs counted on its executed work, memory parts and
    totals in bytes), and ``domains`` (rounds).
    """
    if results.get("status") != "completed" or not results.get("rounds"):
        return None  # a failed or interrupted run (e.g. its Ray actors died) is not averaged
    row = {"accuracy": _mean(domain_curve(results))}
    row.update({key: _mean(_series(results, TRAIN + metric)) for key, metric in ROUND_METRICS.items()})
    return {**row, "domains": float(len(results["rounds"]))}


def seed_values(runs: Mapping[int, Mapping], key: str, seeds: Sequence[int]) -> list[float]:
    """``method_row(run)[key]`` per seed in ``seeds`` order (NaN where the run did not complete)."""
    return per_seed(runs, lambda run: (method_row(run) or {}).get(key), seeds)
