"""The multi-application comparison's schedules, scored with measured accuracies and times (seed 003, III-C2, IV-C).

n in :data:`APP_COUNTS` co-running apps, each the SAME master on a different sequence of the
held-out domains (a rotation of them: one task, different domains -- a simplification of the
paper's mix of vision tasks). At every step ElasticDNN (estimated accuracies, evolutionary search
of eq. 8-11), Uniform (equal shares at one fixed size), Ekya-like (one fixed size, greedy shares
from an oracle profile of the measured accuracies, profiling charged nothing: the most favourable
Ekya) and an oracle (exhaustive search on the measured accuracies: the upper bound) plan the
window; every plan is checked against eq. 11 and scored with the MEASURED accuracies and times
(:func:`models.elastic.scheduler.window_accuracy`).

Uniform and Ekya-like run at every candidate size. Two of their sizes are reported: the paper's
default surrogate (:data:`BASELINE_SIZE`), and the best single size that fits the window
(:func:`best_fixed_size`): among the sizes at which Uniform's equal shares let every app finish
retraining inside the window on every sampled device and step, the one with the highest window
accuracy -- chosen in hindsight on the scored steps, the most favourable fixed size for the
baseline. ElasticDNN's gain over that is what its per-step, per-app choice adds beyond picking a
good size once.

Times: every scheduler gets the measured T of (size, domain) on a sampled device,
``T_device = T_host * host_rate / device_rate`` (:func:`device_time_factors`), where ``host_rate``
is this host's FLOP/s on the measured work (:func:`host_flops_per_s`). The window is the paper's 10
minutes (IV-C) scaled by the training FLOPs of our master over those of the paper's ResNet56
(:func:`paper_scaled_window`: same device, same number of master retrainings per window), times a
scale in :data:`WINDOW_SCALES`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from experiments.claims.elastic_estimate import estimate
from experiments.claims.elastic_measure import Measurements
from experiments.fleet.budgets import sample_budget
from experiments.schema import RunConfig
from models.catalog import build_model
from models.costs import train_flops_per_sample
from models.elastic.estimator import AccuracyEstimator
from models.elastic.scheduler import (
    FEASIBILITY_RTOL,
    Schedule,
    ekya_like_schedule,
    evolutionary_search,
    exhaustive_search,
    uniform_schedule,
    window_accuracy,
)

#: Co-running applications (paper IV-C: 2 to 4).
APP_COUNTS = (2, 3, 4)
#: The paper's default surrogate size (20 %), one of the two sizes Uniform and Ekya-like are reported at.
BASELINE_SIZE = 0.2
#: Retraining window of the paper's multi-app evaluation (IV-C: "each retraining window (10 minutes)").
PAPER_WINDOW_S = 600.0
#: The paper's master for the window scaling: ResNet56 at its published width 16 (He et al. 2016).
PAPER_MASTER, PAPER_MASTER_WIDTH = "fbs_resnet56", 16
#: The paper-scaled window, and a 4x tighter one in which the sizes compete for time (assumption).
WINDOW_SCALES = (1.0, 0.25)
#: Schedulers with one score per step; Uniform and Ekya-like also have one per size (FIXED_SIZE).
SCHEDULERS = ("elasticdnn", "uniform", "ekya_like", "oracle")
FIXED_SIZE = ("uniform", "ekya_like")


# --------------------------------------------------------------------------- times and window
def host_flops_per_s(meas: Measurements, domains: Sequence[int]) -> float:
    """This host's FLOP/s: median over ``domains`` of counted FLOPs / seconds at the largest size."""
    largest = int(np.argmax(meas.sizes))
    rates = meas.flops[list(domains), largest] / meas.seconds[list(domains), largest]
    return float(np.median(rates))


def paper_scaled_window(model: nn.Module, num_classes: int, input_shape: tuple[int, ...]) -> float:
    """:data:`PAPER_WINDOW_S` x training FLOPs per sample of ``model`` / those of the paper's ResNet56."""
    reference = build_model(PAPER_MASTER, num_classes=num_classes, width=PAPER_MASTER_WIDTH,
                            in_channels=input_shape[0])
    return PAPER_WINDOW_S * train_flops_per_sample(model, input_shape) / train_flops_per_sample(reference, input_shape)


def device_time_factors(cfg: RunConfig, count: int, host_rate: float) -> list[dict]:
    """``count`` budgets of the run's fleet: class, FLOP/s and ``host_rate / device FLOP/s``."""
    devices = []
    for pid in range(count):
        budget = sample_budget(cfg.fleet, cfg.seed, pid)
        devices.append({"device_class": budget.device_class, "flops_per_s": budget.flops_per_s,
                        "time_factor": host_rate / budget.flops_per_s})
    return devices


# --------------------------------------------------------------------------- one step
def app_sequences(test: Sequence[int], apps: int) -> list[list[int]]:
    """App a's domain sequence: the held-out domains rotated by a (distinct domains at every step)."""
    test = list(test)
    if not 1 <= apps <= len(test):
        raise ValueError(f"{apps} apps need between 1 and {len(test)} (the held-out domains) so that "
                         "co-running apps see different domains; lower the app count")
    return [[test[(step + a) % len(test)] for step in range(len(test))] for a in range(apps)]


def check_window(plan: Schedule, times: np.ndarray, t_max: float) -> None:
    """Eq. 11: every retraining app finishes inside the window (``AssertionError`` naming the overrun)."""
    rows = np.arange(times.shape[0])
    finish = plan.start_time + times[rows, list(plan.choice)] / np.where(plan.shares > 0, plan.shares, np.nan)
    late = plan.retrains & ~(finish <= t_max * (1 + FEASIBILITY_RTOL))
    if late.any():
        raise AssertionError(f"plan {plan.choice} with shares {plan.shares.round(3).tolist()} violates eq. 11: "
                             f"apps {np.flatnonzero(late).tolist()} finish at {finish[late].tolist()} > t_max={t_max}")


def _feasible_or_fallback(plan: Schedule, before, after, times, ratios, t_max) -> tuple[Schedule, bool]:
    """``plan`` if it satisfies eq. 11, else equal shares at one size for every app (apps that cannot
    finish serve the model as it is): the size whose plan scores best on the ``before``/``after``
    the scheduler knows (ElasticDNN: its estimates; the oracle: the measurements). Eq. 8-11 make every
    app retrain, so a window too short for all of them has no feasible plan."""
    if plan.feasible:
        return plan, False
    fallbacks = [uniform_schedule(before, after, times, ratios, t_max, j) for j in range(ratios.shape[1])]
    return max(fallbacks, key=lambda candidate: candidate.objective), True


def plan_step(true: tuple[np.ndarray, ...], est: tuple[np.ndarray, ...], sizes: Sequence[float], t_max: float,
              seed: int) -> tuple[dict, int]:
    """Every scheduler's plan for one step; returns the plans and how many fell back (no plan fits eq. 11).

    ``true`` and ``est`` are (before, after, times) tables (n, C); ElasticDNN plans with the
    estimated accuracies, the others with the measured ones; all with the measured times.
    ``plans["uniform"]`` and ``plans["ekya_like"]`` are lists, one plan per size.
    """
    before, after, times = true
    ratios = np.tile(np.asarray(sizes, dtype=float), (before.shape[0], 1))
    elastic, fell = _feasible_or_fallback(evolutionary_search(est[0], est[1], times, ratios, t_max, seed=seed),
                                          est[0], est[1], times, ratios, t_max)
    oracle, oracle_fell = _feasible_or_fallback(exhaustive_search(before, after, times, ratios, t_max),
                                                before, after, times, ratios, t_max)
    sized = range(len(sizes))
    plans = {"elasticdnn": elastic, "oracle": oracle,
             "uniform": [uniform_schedule(before, after, times, ratios, t_max, j) for j in sized],
             "ekya_like": [ekya_like_schedule(before, after, times, ratios, t_max, j) for j in sized]}
    for plan in [elastic, oracle, *plans["uniform"], *plans["ekya_like"]]:
        check_window(plan, times, t_max)
    return plans, int(fell) + int(oracle_fell)


# --------------------------------------------------------------------------- a sequence of steps
def simulate(meas: Measurements, estimator: AccuracyEstimator, train: Sequence[int], test: Sequence[int],
             apps: int, t_max: float, time_factor: float, seed: int) -> dict:
    """Mean window accuracy per scheduler over the held-out steps for ``apps`` co-running apps.

    Returns
    -------
    dict
        Every scheduler of :data:`SCHEDULERS` -> mean over steps and apps of the measured window
        accuracy (Uniform and Ekya-like at :data:`BASELINE_SIZE`); ``uniform_by_size`` and
        ``ekya_like_by_size`` (one per size); ``fits_by_size`` (Uniform's equal shares let every
        app retrain inside the window at every step); ``fallbacks`` (plans replaced because no
        plan satisfied eq. 11).
    """
    if BASELINE_SIZE not in meas.sizes:
        raise ValueError(f"sizes {meas.sizes} must include BASELINE_SIZE={BASELINE_SIZE} (the paper's default size)")
    sequences = app_sequences(test, apps)
    ratios = np.tile(meas.sizes, (apps, 1))
    single: dict[str, list[float]] = {"elasticdnn": [], "oracle": []}
    by_size: dict[str, list[list[float]]] = {name: [] for name in FIXED_SIZE}
    fits, fallbacks = np.ones(len(meas.sizes), dtype=bool), 0
    for step in range(len(test)):
        domains = [sequence[step] for sequence in sequences]
        true = (meas.before[domains], meas.after[domains], meas.seconds[domains] * time_factor)
        estimates = [estimate(estimator, meas, d, list(train) + seq[:step]) for d, seq in zip(domains, sequences)]
        est = (np.stack([e[0] for e in estimates]), np.stack([e[1] for e in estimates]), true[2])
        plans, fell = plan_step(true, est, meas.sizes, t_max, seed=seed + step)
        fallbacks += fell
        for name in single:
            single[name].append(float(window_accuracy(plans[name], *true, ratios, t_max).mean()))
        for name in FIXED_SIZE:
            by_size[name].append([float(window_accuracy(p, *true, ratios, t_max).mean()) for p in plans[name]])
        fits &= np.array([bool(np.all(p.retrains)) for p in plans["uniform"]])
    base = list(meas.sizes).index(BASELINE_SIZE)
    result = {name: float(np.mean(values)) for name, values in single.items()}
    for name in FIXED_SIZE:
        result[f"{name}_by_size"] = np.mean(by_size[name], axis=0).tolist()
        result[name] = result[f"{name}_by_size"][base]
    return {**result, "fits_by_size": fits.tolist(), "fallbacks": fallbacks}


def best_fixed_size(scores: Sequence[float], fits: Sequence[bool]) -> int:
    """Index of the best-scoring size among those that fit (among all sizes when none fits)."""
    if len(scores) != len(fits) or not scores:
        raise ValueError(f"need one score and one fit flag per size, got {len(scores)} scores and {len(fits)} flags")
    candidates = [j for j, ok in enumerate(fits) if ok] or list(range(len(scores)))
    return max(candidates, key=lambda j: scores[j])


def compare(meas: Measurements, estimator: AccuracyEstimator, train: Sequence[int], test: Sequence[int],
            devices: Sequence[dict], window_s: float, app_counts: Sequence[int] = APP_COUNTS,
            window_scales: Sequence[float] = WINDOW_SCALES, seed: int = 0) -> list[dict]:
    """:func:`simulate` for every window scale, app count and device; rows averaged over devices.

    Each row also holds Uniform's and Ekya-like's best fitting size (one size for all devices:
    it fits when it fits on every device), as ``<name>_best`` (score) and ``<name>_best_size``,
    the ``fitting_sizes``, and ``none_fits`` (no size fits: the best of all sizes is taken).
    """
    rows = []
    for scale in window_scales:
        for apps in app_counts:
            per_device = [simulate(meas, estimator, train, test, apps, window_s * scale, dev["time_factor"],
                                   seed=seed + 1000 * index) for index, dev in enumerate(devices)]
            fits = np.all([r["fits_by_size"] for r in per_device], axis=0).tolist()
            row = {"window_scale": float(scale), "t_max_s": window_s * scale, "apps": int(apps),
                   "fallbacks": int(sum(r["fallbacks"] for r in per_device)),
                   "fitting_sizes": [s for s, ok in zip(meas.sizes, fits) if ok], "none_fits": not any(fits)}
            row.update({name: float(np.mean([r[name] for r in per_device])) for name in SCHEDULERS})
            for name in FIXED_SIZE:
                scores = np.mean([r[f"{name}_by_size"] for r in per_device], axis=0).tolist()
                best = best_fixed_size(scores, fits)
                row.update({f"{name}_by_size": scores, f"{name}_best": scores[best],
                            f"{name}_best_size": meas.sizes[best]})
            rows.append(row)
    return rows
