"""The ElasticDNN claims' tables over seeds: methods, memory by part, targets with verdicts, the curve plot.

Every cell is the mean and 95 % Student-t interval over the seeds (n = the seeds whose run
completed; :func:`experiments.claims.seeds.cell`). What a target is judged on is formed seed by
seed first (paired: both methods ran on that seed's data, devices and pre-trained master):
ElasticDNN's accuracy minus Tent's and SHOT's, ``full``'s adaptation time (wall, and FLOPs counted
on the executed work) over ElasticDNN's; a target counts as met only when the whole interval
clears it (:func:`experiments.results.intervals.verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments.claims.elastic_rows import domain_curve, seed_values
from experiments.claims.seeds import cell, completed, target_line
from experiments.results.intervals import Interval, mean_interval, paired_difference, paired_ratio
from experiments.results.plots import integer_axis_locator, new_figure
from experiments.results.progress import format_bytes
from models.elastic.footprint import PARTS

Runs = Mapping[str, Mapping[int, Mapping]]  # label -> seed -> results.json
#: The paper's claims as targets: +10 accuracy points over the same-size Tent and SHOT, >= 5x faster than ``full``.
ACCURACY_GAIN_TARGET = 0.10
SPEEDUP_TARGET = 5.0
#: Same-size methods the accuracy target compares against, each on its own.
TARGET_BASELINES = ("tent", "shot")
#: The reference every speed-up divides: the whole master retrained.
REFERENCE = "full"
POINTS = 100.0  # accuracy in [0, 1] -> points
#: Memory table headings of the parts (models.elastic.footprint.PARTS order).
PART_HEADINGS = {"master": "master", "bank": "bank", "model": "adapted model", "optimizer": "optimizer state",
                 "gradients": "gradients", "activations": "activations"}


def bytes_cell(values: Sequence[float]) -> str:
    """``"1.6 MB ± 2.0 kB (n=3)"``: mean ± 95 % half-width of byte counts; ``-`` when none."""
    interval = mean_interval(values)
    if interval.n == 0:
        return "-"
    spread = "" if math.isnan(interval.half_width) else f" ± {format_bytes(interval.half_width)}"
    return f"{format_bytes(interval.mean)}{spread} (n={interval.n})"


def interval_cell(interval: Interval, scale: float = 1.0, digits: int = 2) -> str:
    """``"3.65 ± 0.20 (n=3)"`` for a paired interval; ``-`` when no seed gives a value."""
    return "-" if interval.n == 0 else f"{interval.format(scale, digits)} (n={interval.n})"


def speedup(runs: Runs, label: str, key: str, seeds: Sequence[int]) -> Interval:
    """``full``'s ``key`` over ``label``'s, seed by seed (seeds where ``label`` spent nothing drop out)."""
    return paired_ratio(seed_values(runs.get(REFERENCE, {}), key, seeds), seed_values(runs.get(label, {}), key, seeds))


def method_table(runs: Runs, seeds: Sequence[int]) -> str:
    """Markdown: one line per method; speed-ups are ``full``'s cost over the method's, per seed."""
    lines = ["| method | accuracy after (%) | before (%) | adapt wall s / domain | speed-up vs full, wall (x) | "
             "GFLOP / domain | speed-up vs full, FLOPs (x) | device memory while adapting | training peak | "
             "model size (%) |", "|---|" + "---|" * 9]
    for label, by_seed in runs.items():
        def values(key: str, by_seed: Mapping = by_seed) -> list[float]:
            return seed_values(by_seed, key, seeds)
        lines.append(
            f"| {label} | {cell(values('accuracy'), POINTS)} | {cell(values('accuracy_before'), POINTS)} | "
            f"{cell(values('wall_s'), digits=3)} | {interval_cell(speedup(runs, label, 'wall_s', seeds))} | "
            f"{cell(values('flops'), 1e-9, 2)} | {interval_cell(speedup(runs, label, 'flops', seeds))} | "
            f"{bytes_cell(values('resident_bytes'))} | {bytes_cell(values('peak_bytes'))} | "
            f"{cell(values('model_fraction'), POINTS)} |")
    return "\n".join(lines)


def memory_table(runs: Runs, seeds: Sequence[int]) -> str:
    """Markdown: what each method keeps on the device, part by part, with the resident and peak sums."""
    resident, training = PARTS[:4], PARTS[4:]
    heads = [PART_HEADINGS[p] for p in resident] + ["= resident"] + [PART_HEADINGS[p] for p in training]
    lines = ["| method | " + " | ".join(heads) + " | = training peak |", "|---|" + "---|" * (len(heads) + 1)]
    for label, by_seed in runs.items():
        def shown(key: str, by_seed: Mapping = by_seed) -> str:
            return bytes_cell(seed_values(by_seed, key, seeds))
        cells = [shown(f"{p}_bytes") for p in resident] + [shown("resident_bytes")]
        cells += [shown(f"{p}_bytes") for p in training] + [shown("peak_bytes")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(runs: Runs, seeds: Sequence[int], variant_effects: Sequence[tuple[str, str, int]] = ()) -> list[str]:
    """The accuracy and speed targets with paired intervals and verdicts, then the variants' effects.

    ``variant_effects``: (label, what differs, sign) -- sign +1 when the variant has it, -1 when
    ``elasticdnn`` has it, so every effect reads "having it minus not having it".
    """
    elastic = runs.get("elasticdnn", {})
    accuracy = seed_values(elastic, "accuracy", seeds)
    lines = []
    for baseline in TARGET_BASELINES:
        gain = paired_difference(accuracy, seed_values(runs.get(baseline, {}), "accuracy", seeds))
        lines.append(target_line(f"ElasticDNN - same-size {baseline} accuracy", gain, ACCURACY_GAIN_TARGET, True,
                                 POINTS, 1, " points"))
    for key, how in (("wall_s", "measured wall time"), ("flops", "FLOPs counted on the executed work")):
        lines.append(target_line(f"ElasticDNN's speed-up over `full`, {how}", speedup(runs, "elasticdnn", key, seeds),
                                 SPEEDUP_TARGET, True, 1.0, 2, "x"))
    for label, meaning, sign in variant_effects:
        if label in runs:
            effect = paired_difference(*[seed_values(runs[x], "accuracy", seeds) for x in (label, "elasticdnn")])
            effect = Interval(sign * effect.mean, *sorted((sign * effect.low, sign * effect.high)), effect.n)
            lines.append(f"- effect of {meaning}: {interval_cell(effect, POINTS, 1)} points (paired per seed)")
    if "source" in runs:
        lines.append(f"- the same-size baselines' model before any adaptation (`source`: the master's 20 % "
                     f"largest-L1 filters, fine-tuned on the proxy part) scores "
                     f"{cell(seed_values(runs['source'], 'accuracy', seeds), POINTS)} %")
    return lines


def mean_curves(runs: Runs, seeds: Sequence[int]) -> dict[str, list[float]]:
    """Per method, accuracy after adaptation per domain index, averaged over the completed seeds."""
    curves = {}
    for label, by_seed in runs.items():
        done = [domain_curve(by_seed[s]) for s in seeds if completed(by_seed.get(s))]
        length = min((len(c) for c in done), default=0)
        curves[label] = np.mean([c[:length] for c in done], axis=0).tolist() if length else []
    return curves


def plot_curves(curves: Mapping[str, Sequence[float]], path: Path) -> Path:
    """PNG: accuracy after adaptation vs domain index, one line per method (mean over seeds and devices)."""
    figure, axes = new_figure()
    ax = axes[0][0]
    for method, curve in curves.items():
        if curve:
            ax.plot(range(1, len(curve) + 1), [POINTS * v for v in curve], marker="o", markersize=3, label=method)
    ax.set_xlabel("domain index (each device's own order)")
    ax.set_ylabel("accuracy after adaptation (%)")
    ax.xaxis.set_major_locator(integer_axis_locator())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
