"""ElasticDNN's multi-application comparison, scored with measured runs (seed 003, III-C, IV-C).

Three stages, one seed at a time, on the master of that seed's ElasticDNN run of the claims
preset (:mod:`experiments.claims.elastic`):

1. **Measure** (:mod:`experiments.claims.elastic_measure`): every domain of device 0's evolving
   sequence at every candidate surrogate size, from the pre-trained master: accuracy before and
   after retraining, host wall time and the FLOPs of the executed work.
2. **Estimate** (:mod:`experiments.claims.elastic_estimate`): the accuracy estimator fitted on
   the first half of the domains, calibrated with eq. 5-7 on the other half.
3. **Schedule and score** (:mod:`experiments.claims.elastic_schedule`): 2-4 co-running apps on
   the held-out domains; ElasticDNN's scheduler, Uniform and Ekya-like (at the paper's 20 %
   surrogate and at the best single size that fits the window) and an oracle, all scored with the
   measured accuracies and times on sampled devices.

Each seed's report is cached as JSON (:func:`seed_report`) and reused while it was measured on
the same configuration, sizes and app counts. The tables over seeds are in
:mod:`experiments.claims.elastic_multiapp_tables`.

``python -m experiments.claims.elastic_multiapp`` measures (or, with ``--no-run``, only reads)
the reports of the preset's finished ElasticDNN runs and prints the multi-app section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from experiments.claims.elastic_estimate import estimator_errors, fit_estimator, split_domains
from experiments.claims.elastic_measure import DomainBatch, Measurements, domain_batches, load_master, measure
from experiments.claims.elastic_rows import DEFAULT_OUT, DEFAULT_SEVERITY, multiapp_path, run_folder
from experiments.claims.elastic_schedule import (
    APP_COUNTS,
    BASELINE_SIZE,
    WINDOW_SCALES,
    compare,
    device_time_factors,
    host_flops_per_s,
    paper_scaled_window,
)
from experiments.claims.seeds import add_seed_arguments, completed
from experiments.config import from_dict
from experiments.data import to_tensor
from experiments.results.aside import free_name
from experiments.resume.cached_run import WHERE_KEYS
from experiments.resume.checkpoint import config_differences
from experiments.schema import RunConfig
from models.elastic.remodel import RemodelSettings

__all__ = ["APP_COUNTS", "BASELINE_SIZE", "CANDIDATE_SIZES", "DomainBatch", "Measurements", "domain_batches",
           "load_master", "run_multiapp", "seed_report", "seed_reports"]

#: Candidate surrogate sizes (keep fractions).
CANDIDATE_SIZES = (0.1, 0.2, 0.3, 0.5)
#: Device budgets drawn from the run's fleet config (partition ids 0..n-1; assumption).
SAMPLED_DEVICES = 8
#: Clean proxy samples whose mean penultimate features stand for the source domain (assumption).
SOURCE_SAMPLES = 500
#: The device whose evolving sequence is measured (the runs' devices are 0..n-1).
MEASURED_PARTITION = 0


def run_multiapp(cfg: RunConfig, sizes: Sequence[float] = CANDIDATE_SIZES, app_counts: Sequence[int] = APP_COUNTS,
                 window_scales: Sequence[float] = WINDOW_SCALES, devices: int = SAMPLED_DEVICES,
                 partition_id: int = MEASURED_PARTITION) -> dict:
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


def seed_report(elastic_run: Mapping, path: Path, sizes: Sequence[float], apps: Sequence[int],
                run: bool = True) -> dict | None:
    """The multi-app report on the master of one seed's ElasticDNN run (None if that run did not complete).

    ``path`` holds the report: it is reused while it was measured on the same configuration,
    sizes and app counts; otherwise it is moved aside to ``<name>.stale-<n>`` and measured again
    (delete it to measure again anyway). With ``run=False`` nothing is measured or moved: a
    current report is returned, anything else is None (with a note on stderr).
    """
    config = elastic_run.get("config")
    if not completed(elastic_run) or config is None:
        return None
    asked = {"sizes": [float(s) for s in sizes], "apps": [int(a) for a in apps]}
    if path.exists():
        stored = json.loads(path.read_text())
        stale = config_differences(stored.get("config") or {}, config, WHERE_KEYS)
        stale += [key for key, value in asked.items() if stored.get("asked", {}).get(key) != value]
        if not stale:
            return stored
        if not run:
            print(f"{path}: measured with other {', '.join(stale[:5])}; not counted (--no-run measures nothing)",
                  file=sys.stderr)
            return None
        aside = free_name(path)
        print(f"{path}: measured with other {', '.join(stale[:5])}; moved to {aside.name} and measuring again",
              file=sys.stderr)
        path.rename(aside)
    if not run:
        print(f"{path}: no multi-app report (--no-run measures nothing)", file=sys.stderr)
        return None
    report = run_multiapp(from_dict(config), sizes, apps)
    report.update(config=config, asked=asked)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


def seed_reports(elastic_runs: Mapping[int, Mapping], args: argparse.Namespace) -> dict[int, dict | None]:
    """:func:`seed_report` of every seed in ``args.seeds`` (``args.no_run``: read only)."""
    return {seed: seed_report(elastic_runs.get(seed) or {}, multiapp_path(args.out, args.severity, seed),
                              args.sizes, args.apps, run=not args.no_run)
            for seed in args.seeds}


def build_parser() -> argparse.ArgumentParser:
    """The comparison's command line (the elastic preset's folders, seeds, sizes and app counts)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the elastic preset's folder (its ElasticDNN runs and the cached reports)")
    parser.add_argument("--severity", type=int, default=DEFAULT_SEVERITY)
    add_seed_arguments(parser)
    parser.add_argument("--sizes", type=float, nargs="+", default=list(CANDIDATE_SIZES))
    parser.add_argument("--apps", type=int, nargs="+", default=list(APP_COUNTS))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure (or read) each seed's report on the preset's finished ElasticDNN runs and print the section."""
    from experiments.claims.elastic_multiapp_tables import multiapp_section

    args = build_parser().parse_args(argv)
    runs = {}
    for seed in args.seeds:
        path = run_folder(args.out, args.severity, "elasticdnn", seed) / "results.json"
        runs[seed] = json.loads(path.read_text()) if path.exists() else {}
        if not completed(runs[seed]):
            print(f"{path}: no completed ElasticDNN run (python -m experiments.claims.elastic runs it)",
                  file=sys.stderr)
    print("\n".join(multiapp_section(seed_reports(runs, args), args.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
