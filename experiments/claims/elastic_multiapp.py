"""ElasticDNN's multi-application comparison, scored with measured runs (seed 003, III-C, IV-C).

Three stages:

1. **Measure.** On the run's pre-trained master (loaded from the pre-training cache the runs
   used), for every domain of one device's evolving sequence and every candidate surrogate size
   (keep fraction): remodel + retrain on the domain's unlabeled batch
   (:func:`models.elastic.remodel.remodel_for_domain`), accuracy of the surrogate before and
   after retraining on the domain's held-out batch, the measured wall time T (this host) and
   the retraining FLOPs; plus the master's mean penultimate features of the batch. Every run
   starts from the same pre-trained master (the apps' masters do not evolve here).
2. **Estimate.** The accuracy estimator (:class:`models.elastic.estimator.AccuracyEstimator`,
   inputs: remodel ratio, distance of mean penultimate features to the source's, and the
   domain representation) is fitted on the first half of the domains; on the other half its
   predictions are calibrated with eq. 5-7 against past domains (the training domains and the
   app's earlier domains, each monitored at every size: a simplification, a real device only
   monitors the size it ran).
3. **Schedule and score.** n in :data:`APP_COUNTS` co-running apps, each the SAME master on a
   different sequence of the held-out domains (a rotation of them: one task, different
   domains — a simplification of the paper's mix of vision tasks). At every step ElasticDNN
   (estimated accuracies, evolutionary search of eq. 8-11), Uniform (:data:`BASELINE_SIZE`,
   equal shares), Ekya-like (:data:`BASELINE_SIZE`, greedy shares from an oracle profile of the
   measured accuracies, profiling charged nothing: the most favourable Ekya) and an oracle
   (exhaustive search on the measured accuracies: the upper bound) plan the window; every plan
   is checked against eq. 11 and scored with the MEASURED accuracies and times
   (:func:`models.elastic.scheduler.window_accuracy`).

Times and window. Every scheduler gets the measured T of (size, domain), converted to a
sampled device: ``T_device = T_host * host_rate / device_rate``, where ``host_rate`` is this
host's retraining FLOP/s (median over the training domains at the largest size, the most
compute-bound runs) and ``device_rate`` a budget drawn by :func:`experiments.fleet.budgets.sample_budget`
from the run's fleet config (device classes of ``experiments/fleet/classes.py``). The window
is the paper's 10 minutes (IV-C) scaled by the training FLOPs of our master over those of the
paper's ResNet56 (same device, same number of master retrainings per window), times a scale in
:data:`WINDOW_SCALES`. On the shared CPU host the measured T include per-call overheads, so
small surrogates are relatively slower than their FLOPs say.

``python -m experiments.claims.elastic_multiapp --run-dir <an elasticdnn run folder>`` runs it alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from experiments.algorithms import ALGORITHMS
from experiments.config import from_dict
from experiments.data import build_federated_data, to_tensor
from experiments.fleet.budgets import sample_budget
from experiments.pretrain.cache import pretrained_model
from experiments.pretrain.networks import build_run_model
from experiments.schema import RunConfig
from models.catalog import build_model
from models.costs import train_flops_per_sample
from models.elastic.estimator import (
    FIT_EPOCHS,
    AccuracyEstimator,
    calibrate,
    domain_distance,
    domain_representation,
    estimator_inputs,
)
from models.elastic.master import ElasticMaster
from models.elastic.remodel import RemodelSettings, remodel_for_domain
from models.elastic.scheduler import (
    FEASIBILITY_RTOL,
    Schedule,
    ekya_like_schedule,
    evolutionary_search,
    exhaustive_search,
    uniform_schedule,
    window_accuracy,
)
from models.training import accuracy

#: Candidate surrogate sizes (keep fractions).
CANDIDATE_SIZES = (0.1, 0.2, 0.3, 0.5)
#: Co-running applications (paper IV-C: 2 to 4).
APP_COUNTS = (2, 3, 4)
#: Uniform's and Ekya-like's fixed size: the default surrogate size (20 %).
BASELINE_SIZE = 0.2
#: Share of the domains the estimator is fitted on (the first ones of the device's order).
TRAIN_DOMAIN_SHARE = 0.5
#: Retraining window of the paper's multi-app evaluation (IV-C: "each retraining window (10 minutes)").
PAPER_WINDOW_S = 600.0
#: The paper's master for the window scaling: ResNet56 at its published width 16 (He et al. 2016).
PAPER_MASTER, PAPER_MASTER_WIDTH = "fbs_resnet56", 16
#: The paper-scaled window, and a 4x tighter one in which the sizes compete for time (assumption).
WINDOW_SCALES = (1.0, 0.25)
#: Device budgets drawn from the run's fleet config (partition ids 0..n-1; assumption).
SAMPLED_DEVICES = 8
#: Clean proxy samples whose mean penultimate features stand for the source domain (assumption).
SOURCE_SAMPLES = 500
#: Schedulers compared, in table order.
SCHEDULERS = ("elasticdnn", "uniform", "ekya_like", "oracle")


@dataclass(frozen=True)
class DomainBatch:
    """One domain of the device's sequence: a batch to adapt on, a labelled held-out batch."""

    domain: str
    x: Tensor
    held_x: Tensor
    held_y: Tensor


@dataclass(frozen=True)
class Measurements:
    """Measured runs: D domains x C sizes.

    Attributes
    ----------
    sizes : tuple of float
        Keep fractions (the remodel ratios s of eq. 9-10).
    domains : tuple of str
    before, after : np.ndarray
        (D, C) held-out accuracy of the surrogate before / after retraining.
    seconds : np.ndarray
        (D, C) measured wall time of surrogate generation + retraining + master update (host).
    flops : np.ndarray
        (D, C) training FLOPs of the retraining (per-sample training FLOPs x samples x epochs).
    target_means : np.ndarray
        (D, d) the master's mean penultimate features of each domain's adaptation batch.
    source_mean : np.ndarray
        (d,) the same on clean source (proxy) samples.
    """

    sizes: tuple[float, ...]
    domains: tuple[str, ...]
    before: np.ndarray
    after: np.ndarray
    seconds: np.ndarray
    flops: np.ndarray
    target_means: np.ndarray
    source_mean: np.ndarray


# --------------------------------------------------------------------------- measuring
def penultimate_features(model: nn.Module, x: Tensor) -> np.ndarray:
    """(N, d) inputs of ``model``'s last Linear layer (the pooled features), in eval mode."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to read penultimate features from")
    captured: list[Tensor] = []
    handle = linears[-1].register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return captured[0].double().numpy()


def domain_batches(data, partition_id: int) -> list[DomainBatch]:
    """Each domain of device ``partition_id``'s evolving sequence, in its order.

    Batch ``p * batches_per_domain`` of the stream is the adaptation batch of the p-th domain,
    the next one its held-out batch (the ``evolving`` scenario's layout, 2 batches per domain).
    """
    per_domain = data.scenario.batches_per_domain
    if per_domain < 2:
        raise ValueError(f"scenario.batches_per_domain={per_domain}; need >= 2 (adapt + held-out), "
                         "use scenario=evolving")
    batches = []
    for position, domain in enumerate(data.device_domains(partition_id)):
        adapt = data.stream_batch(partition_id, position * per_domain)
        held = data.stream_batch(partition_id, position * per_domain + 1)
        batches.append(DomainBatch(domain, to_tensor(adapt.x), to_tensor(held.x), torch.as_tensor(held.y)))
    return batches


def measure_domain(elastic: ElasticMaster, batch: DomainBatch, sizes: Sequence[float], settings: RemodelSettings,
                   seed: int) -> tuple[np.ndarray, ...]:
    """Before/after accuracy, wall seconds and FLOPs of one domain at every size (fresh master copy each).

    Returns
    -------
    tuple of np.ndarray
        ``(before, after, seconds, flops)``, each (C,).
    """
    rows = []
    for size in sizes:
        master_copy = copy.deepcopy(elastic)
        surrogate, report = remodel_for_domain(master_copy, batch.x, dataclasses.replace(settings, keep_fraction=size),
                                               seed)
        with torch.no_grad():
            before = accuracy(report["surrogate_before"], batch.held_x, batch.held_y)
            after = accuracy(surrogate, batch.held_x, batch.held_y)
        flops = train_flops_per_sample(surrogate, tuple(batch.x.shape[1:])) * len(batch.x) * settings.epochs
        rows.append((before, after, report["adapt_wall_s"], flops))
    return tuple(np.array(column, dtype=float) for column in zip(*rows))


def measure(elastic: ElasticMaster, batches: Sequence[DomainBatch], source_x: Tensor, sizes: Sequence[float],
            settings: RemodelSettings, seed: int) -> Measurements:
    """Run :func:`measure_domain` on every batch; the master itself is left unchanged."""
    if not batches:
        raise ValueError("no domain batches to measure; the scenario needs corruptions")
    if not sizes or any(not 0 < s <= 1 for s in sizes):
        raise ValueError(f"sizes must be keep fractions in (0, 1], got {tuple(sizes)}")
    columns = [measure_domain(elastic, batch, sizes, settings, seed) for batch in batches]
    before, after, seconds, flops = (np.stack(c) for c in zip(*columns))
    targets = np.stack([penultimate_features(elastic.master, b.x).mean(axis=0) for b in batches])
    return Measurements(tuple(float(s) for s in sizes), tuple(b.domain for b in batches), before, after, seconds,
                        flops, targets, penultimate_features(elastic.master, source_x).mean(axis=0))


# --------------------------------------------------------------------------- estimating
def split_domains(count: int, train_share: float = TRAIN_DOMAIN_SHARE) -> tuple[list[int], list[int]]:
    """Indices of the estimator's training domains (the first ``floor(share * count)``) and the rest."""
    cut = int(np.floor(train_share * count))
    if not 1 <= cut < count:
        raise ValueError(f"{count} domains with train_share={train_share} leave no training or no test domain; "
                         "need at least 2 domains and a share that splits them")
    return list(range(cut)), list(range(cut, count))


def domain_inputs(meas: Measurements, domain: int) -> np.ndarray:
    """Estimator rows (C, 2 + 2d) of one domain: [s, dis to source, source mean ++ target mean]."""
    target = meas.target_means[domain]
    representation = domain_representation(meas.source_mean[None, :], target[None, :])
    return estimator_inputs(meas.sizes, domain_distance(meas.source_mean, target), representation)


def fit_estimator(meas: Measurements, train: Sequence[int], seed: int, epochs: int = FIT_EPOCHS) -> AccuracyEstimator:
    """The accuracy estimator fitted on the measured (A, Ã) of the training domains (III-C1).

    ``epochs`` of full-batch Adam (default :data:`models.elastic.estimator.FIT_EPOCHS`).
    """
    inputs = np.vstack([domain_inputs(meas, d) for d in train])
    targets = np.vstack([np.column_stack([meas.before[d], meas.after[d]]) for d in train])
    return AccuracyEstimator(inputs.shape[1]).fit(inputs, targets, epochs=epochs, seed=seed)


def estimate(estimator: AccuracyEstimator, meas: Measurements, domain: int,
             past: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Estimated (A, Ã) at every size of ``domain``, calibrated with the ``past`` domains (eq. 5-7)."""
    predicted = estimator.predict(domain_inputs(meas, domain))
    past = list(past)
    distances = [domain_distance(meas.target_means[domain], meas.target_means[a]) for a in past]
    return calibrate(predicted[:, 0], predicted[:, 1], distances, meas.before[past], meas.after[past])


def estimator_errors(estimator: AccuracyEstimator, meas: Measurements, train: Sequence[int],
                     test: Sequence[int]) -> dict[str, float]:
    """Mean absolute error (accuracy points in [0, 1]) on the test domains, raw and calibrated with ``train``."""
    raw, calibrated = [], []
    for d in test:
        predicted = estimator.predict(domain_inputs(meas, d))
        truth = np.column_stack([meas.before[d], meas.after[d]])
        raw.append(np.abs(predicted - truth))
        calibrated.append(np.abs(np.column_stack(estimate(estimator, meas, d, train)) - truth))
    raw_mae, cal_mae = np.mean(raw, axis=(0, 1)), np.mean(calibrated, axis=(0, 1))
    return {"before_raw": float(raw_mae[0]), "after_raw": float(raw_mae[1]),
            "before_calibrated": float(cal_mae[0]), "after_calibrated": float(cal_mae[1])}


# --------------------------------------------------------------------------- times and window
def host_flops_per_s(meas: Measurements, domains: Sequence[int]) -> float:
    """This host's retraining FLOP/s: median over ``domains`` of FLOPs / seconds at the largest size."""
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


# --------------------------------------------------------------------------- scheduling
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
              seed: int) -> tuple[dict[str, Schedule], int]:
    """Every scheduler's plan for one step; returns the plans and how many fell back (no plan fits eq. 11).

    ``true`` and ``est`` are (before, after, times) tables (n, C); ElasticDNN plans with the
    estimated accuracies, the others with the measured ones; all with the measured times.
    """
    before, after, times = true
    ratios = np.tile(np.asarray(sizes, dtype=float), (before.shape[0], 1))
    base = list(sizes).index(BASELINE_SIZE)
    elastic, fell = _feasible_or_fallback(evolutionary_search(est[0], est[1], times, ratios, t_max, seed=seed),
                                          est[0], est[1], times, ratios, t_max)
    oracle, oracle_fell = _feasible_or_fallback(exhaustive_search(before, after, times, ratios, t_max),
                                                before, after, times, ratios, t_max)
    plans = {"elasticdnn": elastic, "uniform": uniform_schedule(before, after, times, ratios, t_max, base),
             "ekya_like": ekya_like_schedule(before, after, times, ratios, t_max, base), "oracle": oracle}
    for plan in plans.values():
        check_window(plan, times, t_max)
    return plans, int(fell) + int(oracle_fell)


def simulate(meas: Measurements, estimator: AccuracyEstimator, train: Sequence[int], test: Sequence[int],
             apps: int, t_max: float, time_factor: float, seed: int) -> dict[str, float]:
    """Mean window accuracy per scheduler over the held-out steps for ``apps`` co-running apps.

    Returns
    -------
    dict
        ``scheduler -> mean over steps and apps of the measured window accuracy``, plus
        ``fallbacks`` (plans replaced because no plan satisfied eq. 11).
    """
    if BASELINE_SIZE not in meas.sizes:
        raise ValueError(f"sizes {meas.sizes} must include BASELINE_SIZE={BASELINE_SIZE} (Uniform's and Ekya's size)")
    sequences = app_sequences(test, apps)
    scores: dict[str, list[float]] = {name: [] for name in SCHEDULERS}
    fallbacks = 0
    for step in range(len(test)):
        domains = [sequence[step] for sequence in sequences]
        true = (meas.before[domains], meas.after[domains], meas.seconds[domains] * time_factor)
        estimates = [estimate(estimator, meas, d, list(train) + seq[:step]) for d, seq in zip(domains, sequences)]
        est = (np.stack([e[0] for e in estimates]), np.stack([e[1] for e in estimates]), true[2])
        plans, fell = plan_step(true, est, meas.sizes, t_max, seed=seed + step)
        fallbacks += fell
        for name, plan in plans.items():
            scores[name].append(float(window_accuracy(plan, *true, np.tile(meas.sizes, (apps, 1)), t_max).mean()))
    return {**{name: float(np.mean(v)) for name, v in scores.items()}, "fallbacks": fallbacks}


def compare(meas: Measurements, estimator: AccuracyEstimator, train: Sequence[int], test: Sequence[int],
            devices: Sequence[dict], window_s: float, app_counts: Sequence[int] = APP_COUNTS,
            window_scales: Sequence[float] = WINDOW_SCALES, seed: int = 0) -> list[dict]:
    """:func:`simulate` for every window scale, app count and device; rows averaged over devices."""
    rows = []
    for scale in window_scales:
        for apps in app_counts:
            per_device = [simulate(meas, estimator, train, test, apps, window_s * scale, dev["time_factor"],
                                   seed=seed + 1000 * index) for index, dev in enumerate(devices)]
            row = {"window_scale": float(scale), "t_max_s": window_s * scale, "apps": int(apps),
                   "fallbacks": int(sum(r["fallbacks"] for r in per_device))}
            row.update({name: float(np.mean([r[name] for r in per_device])) for name in SCHEDULERS})
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- the whole experiment
def load_master(cfg: RunConfig):
    """The run's data and its pre-trained ElasticMaster (from the pre-training cache the runs filled)."""
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
    if not isinstance(model, ElasticMaster):
        raise ValueError(f"model {cfg.model.name} is not an ElasticDNN master; pass an algorithm=elasticdnn run")
    model = pretrained_model(cfg, model, data, ALGORITHMS[cfg.algorithm.name].pretraining(cfg))
    return data, model


def run_multiapp(cfg: RunConfig, sizes: Sequence[float] = CANDIDATE_SIZES, app_counts: Sequence[int] = APP_COUNTS,
                 window_scales: Sequence[float] = WINDOW_SCALES, devices: int = SAMPLED_DEVICES,
                 partition_id: int = 0) -> dict:
    """Measure, fit, schedule and score (module docstring); returns a JSON-able report.

    Sets torch's thread count to the run's ``engine.torch_threads`` (what each device used in
    the runs), so the measured times are comparable with theirs.
    """
    torch.set_num_threads(cfg.engine.torch_threads)
    started = time.perf_counter()
    data, elastic = load_master(cfg)
    opts = cfg.algorithm.options
    settings = RemodelSettings(mass=opts.mass, loss=opts.loss, epochs=opts.epochs, lr=opts.lr,
                               batch_size=opts.batch_size)
    source_x = to_tensor(data.proxy()[0][:SOURCE_SAMPLES])
    meas = measure(elastic, domain_batches(data, partition_id), source_x, sizes, settings, cfg.seed)
    measured_s = time.perf_counter() - started
    train, test = split_domains(len(meas.domains))
    estimator = fit_estimator(meas, train, cfg.seed)
    host_rate = host_flops_per_s(meas, train)
    window_s = paper_scaled_window(elastic.master, data.num_classes, tuple(data.image_shape))
    fleet = device_time_factors(cfg, devices, host_rate)
    rows = compare(meas, estimator, train, test, fleet, window_s, app_counts, window_scales, cfg.seed)
    return {
        "sizes": list(meas.sizes), "domains": list(meas.domains),
        "train_domains": [meas.domains[d] for d in train], "test_domains": [meas.domains[d] for d in test],
        "measured": {"before": meas.before.tolist(), "after": meas.after.tolist(),
                     "seconds": meas.seconds.tolist(), "flops": meas.flops.tolist()},
        "host_flops_per_s": host_rate, "window_s": window_s, "devices": fleet,
        "estimator_mae": estimator_errors(estimator, meas, train, test),
        "rows": rows, "measure_wall_s": measured_s, "wall_s": time.perf_counter() - started,
    }


def markdown(report: dict) -> str:
    """The comparison as Markdown: window accuracy (%) per window, app count and scheduler."""
    lines = ["| window t_max | apps | " + " | ".join(SCHEDULERS) + " | ElasticDNN - Uniform | fallbacks |",
             "|---|---|" + "---|" * (len(SCHEDULERS) + 2)]
    for row in report["rows"]:
        cells = " | ".join(f"{100 * row[name]:.1f}" for name in SCHEDULERS)
        gain = 100 * (row["elasticdnn"] - row["uniform"])
        lines.append(f"| {row['t_max_s']:.1f} s (x{row['window_scale']:g}) | {row['apps']} | {cells} | "
                     f"{gain:+.1f} | {row['fallbacks']} |")
    return "\n".join(lines)


def measured_table(report: dict) -> str:
    """Markdown: mean measured accuracy before/after and host seconds per size (all domains)."""
    before, after = np.array(report["measured"]["before"]), np.array(report["measured"]["after"])
    seconds = np.array(report["measured"]["seconds"])
    lines = ["| keep fraction | accuracy before (%) | after (%) | host seconds |", "|---|---|---|---|"]
    for c, size in enumerate(report["sizes"]):
        lines.append(f"| {size:g} | {100 * before[:, c].mean():.1f} | {100 * after[:, c].mean():.1f} | "
                     f"{seconds[:, c].mean():.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison on an elasticdnn run's configuration and print (and optionally save) it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="an algorithm=elasticdnn run folder (results.json)")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(CANDIDATE_SIZES))
    parser.add_argument("--apps", type=int, nargs="+", default=list(APP_COUNTS))
    parser.add_argument("--window-scales", type=float, nargs="+", default=list(WINDOW_SCALES))
    parser.add_argument("--devices", type=int, default=SAMPLED_DEVICES)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    cfg = from_dict(json.loads((args.run_dir / "results.json").read_text())["config"])
    report = run_multiapp(cfg, args.sizes, args.apps, args.window_scales, args.devices)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    print(measured_table(report))
    print()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
