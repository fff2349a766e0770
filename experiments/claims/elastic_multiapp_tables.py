"""The multi-application comparison over seeds: measured sizes, window accuracy per scheduler, targets.

Every cell is the mean and 95 % Student-t interval over the seeds' reports
(:func:`experiments.claims.seeds.cell`); a gain of ElasticDNN's scheduler over a baseline is
taken seed by seed first (paired: both scored on that seed's master, domains and devices) and its
target is judged on the interval (:func:`experiments.results.intervals.verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from experiments.claims.elastic_schedule import BASELINE_SIZE
from experiments.claims.seeds import cell, seeds_caption, target_line
from experiments.results.intervals import mean_interval, paired_difference

Reports = Mapping[int, Mapping | None]
#: Table columns: (heading, key in a compare() row); Uniform and Ekya-like at both sizes.
SCORE_COLUMNS = (
    ("ElasticDNN", "elasticdnn"),
    (f"Uniform @{BASELINE_SIZE:g}", "uniform"),
    (f"Ekya-like @{BASELINE_SIZE:g}", "ekya_like"),
    ("Uniform @best fitting size", "uniform_best"),
    ("Ekya-like @best fitting size", "ekya_like_best"),
    ("oracle", "oracle"),
)
#: What the scheduler's gain is judged against: (label, key), each with target MULTIAPP_GAIN_TARGET.
GAIN_BASELINES = (
    (f"Uniform at the {100 * BASELINE_SIZE:g} % surrogate (the paper's comparison)", "uniform"),
    ("Uniform at the best single size that fits each window", "uniform_best"),
    ("Ekya-like at the best single size that fits each window", "ekya_like_best"),
)
#: The scheduler is claimed to beat each baseline: gain >= 0 points, over the whole interval.
MULTIAPP_GAIN_TARGET = 0.0
POINTS = 100.0  # accuracy in [0, 1] -> points


def _seeds_of(reports: Reports, seeds: Sequence[int], value: Callable[[Mapping], float]) -> list[float]:
    """``value(report)`` per seed (NaN where a seed has no report)."""
    return [value(reports[s]) if reports.get(s) else math.nan for s in seeds]


def _cells(reports: Reports) -> list[tuple[float, int]]:
    """The (window scale, apps) cells of the reports, in the first report's order."""
    first = next((r for r in reports.values() if r), None)
    return [] if first is None else [(row["window_scale"], row["apps"]) for row in first["rows"]]


def _row(report: Mapping, key: tuple[float, int]) -> Mapping:
    for row in report["rows"]:
        if (row["window_scale"], row["apps"]) == key:
            return row
    raise ValueError(f"report has no row for window scale {key[0]} and {key[1]} apps; measure all seeds alike")


def measured_table(reports: Reports, seeds: Sequence[int]) -> str:
    """Markdown: per size, the measured accuracy before/after, host seconds and GFLOPs (means over domains)."""
    first = next((r for r in reports.values() if r), None)
    if first is None:
        return "(no measurement)"
    lines = ["| keep fraction | accuracy before (%) | after (%) | host seconds | GFLOP |", "|---|---|---|---|---|"]
    for c, size in enumerate(first["sizes"]):
        def per_size(name: str, c: int = c) -> list[float]:
            return _seeds_of(reports, seeds, lambda r: float(np.mean(np.array(r["measured"][name])[:, c])))
        lines.append(f"| {size:g} | {cell(per_size('before'), POINTS)} | {cell(per_size('after'), POINTS)} | "
                     f"{cell(per_size('seconds'), digits=2)} | {cell(per_size('flops'), 1e-9, 2)} |")
    return "\n".join(lines)


def _best_sizes(reports: Reports, seeds: Sequence[int], key: tuple[float, int], name: str) -> str:
    """The best fitting size per seed, ``0.5/0.5/0.3`` (``*`` where no size fitted that seed's window)."""
    shown = []
    for seed in seeds:
        report = reports.get(seed)
        if not report:
            shown.append("-")
            continue
        row = _row(report, key)
        shown.append(f"{row[f'{name}_best_size']:g}{'*' if row['none_fits'] else ''}")
    return "/".join(shown)


def multiapp_table(reports: Reports, seeds: Sequence[int]) -> str:
    """Markdown: window accuracy (%) per window, app count and scheduler, and ElasticDNN's paired gains."""
    heads = [h for h, _ in SCORE_COLUMNS] + [f"ElasticDNN - {h}" for h, key in SCORE_COLUMNS[1:5]]
    lines = ["| window t_max | apps | " + " | ".join(heads) + " | best sizes (Uniform; Ekya-like) | fallbacks |",
             "|---|---|" + "---|" * (len(heads) + 2)]
    for key in _cells(reports):
        def values(name: str, key: tuple[float, int] = key) -> list[float]:
            return _seeds_of(reports, seeds, lambda r: _row(r, key)[name])
        elastic = values("elasticdnn")
        scores = [cell(values(name), POINTS) for _, name in SCORE_COLUMNS]
        gains = [paired_difference(elastic, values(name)).format(POINTS) for _, name in SCORE_COLUMNS[1:5]]
        t_max = mean_interval(values("t_max_s")).mean
        fallbacks = int(np.nansum(values("fallbacks")))
        sizes = f"{_best_sizes(reports, seeds, key, 'uniform')}; {_best_sizes(reports, seeds, key, 'ekya_like')}"
        lines.append(f"| {t_max:.1f} s (x{key[0]:g}) | {key[1]} | " + " | ".join(scores + gains)
                     + f" | {sizes} | {fallbacks} |")
    return "\n".join(lines)


def gain_values(reports: Reports, seeds: Sequence[int], baseline: str) -> tuple[list[float], list[float]]:
    """ElasticDNN's and ``baseline``'s window accuracy per seed, each the mean over the report's cells."""
    def mean_of(name: str) -> Callable[[Mapping], float]:
        return lambda r: float(np.mean([row[name] for row in r["rows"]]))
    return _seeds_of(reports, seeds, mean_of("elasticdnn")), _seeds_of(reports, seeds, mean_of(baseline))


def multiapp_targets(reports: Reports, seeds: Sequence[int]) -> list[str]:
    """One bullet per baseline of :data:`GAIN_BASELINES`: ElasticDNN minus it, paired per seed, with its verdict."""
    lines = []
    for label, key in GAIN_BASELINES:
        elastic, baseline = gain_values(reports, seeds, key)
        lines.append(target_line(f"scheduler vs {label}, mean over the (window, apps) cells",
                                 paired_difference(elastic, baseline), MULTIAPP_GAIN_TARGET, True, POINTS, 1,
                                 " points"))
    return lines


def _setting(reports: Reports, seeds: Sequence[int]) -> str:
    """The estimator's errors, the host rate, the devices and the window, over the seeds."""
    first = next((r for r in reports.values() if r), None)
    if first is None:
        return ""
    def mae(name: str) -> str:
        return cell(_seeds_of(reports, seeds, lambda r: r["estimator_mae"][name]), POINTS)
    classes = sorted({d["device_class"] for r in reports.values() if r for d in r["devices"]})
    rate = cell(_seeds_of(reports, seeds, lambda r: r["host_flops_per_s"]), 1e-9, 2)
    return (
        f"Estimator fitted on {len(first['train_domains'])} domains, scored on the other "
        f"{len(first['test_domains'])}: mean absolute error before/after retraining {mae('before_raw')} / "
        f"{mae('after_raw')} points raw, {mae('before_calibrated')} / {mae('after_calibrated')} after calibration "
        f"(eq. 5-7). Times: host rate {rate} GFLOP/s (FLOPs counted on the executed work / measured seconds), "
        f"scaled to {len(first['devices'])} sampled devices per seed ({', '.join(classes)}); window = the paper's "
        f"10 min x our master's / ResNet56's training FLOPs = {first['window_s']:.1f} s, and 4x tighter."
    )


def multiapp_section(reports: Reports, seeds: Sequence[int], with_targets: bool = True) -> list[str]:
    """Markdown lines of the multi-app comparison over the seeds' reports (and its targets, unless listed elsewhere)."""
    if not any(reports.get(s) for s in seeds):
        return ["### Co-running apps", "", "Multi-app comparison: not measured (no seed's ElasticDNN run completed, "
                "or --no-run found no report)."]
    first = next(r for r in reports.values() if r)
    return [
        "### Co-running apps (`python -m experiments.claims.elastic_multiapp`)",
        "",
        f"Measured on each seed's pre-trained master: {len(first['domains'])} domains (device 0's order) x sizes "
        f"{first['sizes']}, each from the pre-trained master (before/after on the held-out batch, host seconds, "
        "FLOPs counted on the executed work):",
        "",
        measured_table(reports, seeds),
        "",
        _setting(reports, seeds),
        "",
        "Each app is the same master on a different rotation of the held-out domains (one task, different domains). "
        "Window accuracy (%) scored with the MEASURED accuracies and times, mean over steps, apps and devices; every "
        "plan passed the eq. 11 check. Uniform and Ekya-like are shown at the paper's "
        f"{100 * BASELINE_SIZE:g} % surrogate and at the best single size that fits the window: among the sizes at "
        "which Uniform's equal shares let every app finish retraining on every sampled device and step, the one "
        "with the highest window accuracy, chosen in hindsight on the scored steps (the most favourable fixed size "
        "for the baseline; `*`: no size fitted, the best of all was taken). ElasticDNN minus that baseline is what "
        "its scheduler adds beyond picking a good size once. Ekya-like gets an oracle profile for free; oracle = "
        "exhaustive search on the measured accuracies. Gains are paired per seed (mean ± half-width). "
        f"{seeds_caption(seeds)}",
        "",
        multiapp_table(reports, seeds),
        *(["", *multiapp_targets(reports, seeds)] if with_targets else []),
    ]
