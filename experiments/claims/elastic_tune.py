"""Search ElasticDNN's and its baselines' retraining rate and passes on the tuning split (seed 003, IV).

The paper searches every method's hyperparameters on its evolving-domain benchmark before the
evaluation ("Online DA settings"). ``python -m experiments.claims.elastic_tune`` does that for the
methods of :data:`models.elastic.remodel.METHODS`: for every method and every (lr, epochs) of
the grid it runs each tuning device's whole evolving sequence without Flower -- the same
per-domain step as a device (:func:`models.elastic.remodel.adapt_to_domain`), the master
(ElasticDNN, ``full``) or the same-size model (the baselines) carried from domain to domain --
and scores the accuracy after adaptation on each domain's held-out batch, as the runs do.

It searches only on the tuning split (:mod:`experiments.data.tuning`): tuning devices
``tune-0``, ... with their own domain orders, draws and renders, streaming originals held back
from every run's devices. No evaluated device, stream or original enters the search, so the
claims' runs score the chosen values on data the search never saw. The run's configuration
comes from Hydra overrides (the claims preset's by default), and the pre-trained master and
compressed model come from the same caches as the runs (the proxy part, not the tuning split).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from experiments.algorithms.elasticdnn import compressed_baseline
from experiments.claims.elastic_measure import DomainBatch, domain_batches, load_master
from experiments.config import compose
from experiments.data.tuning import TUNE_DEVICES, TuningStreams
from models.elastic.master import ElasticMaster
from models.elastic.remodel import METHODS, PRUNED_METHODS, RemodelSettings, adapt_to_domain, pruned_model
from models.training import accuracy

#: The grid (the rates span SHOT's 1e-2 down to Tent's ImageNet 2.5e-4 order; passes around the old 10).
LRS = (1e-2, 3e-3, 1e-3)
EPOCHS = (10, 20)
#: Methods with nothing to tune (no training step).
UNTUNED = ("source", "bn_adapt")


def tuning_sequences(data, devices: int = TUNE_DEVICES) -> tuple[TuningStreams, list[list[DomainBatch]]]:
    """The search's data: the tuning split of ``data`` and every tuning device's evolving sequence.

    Returns
    -------
    tuple
        ``(streams, sequences)``: the :class:`~experiments.data.tuning.TuningStreams` and, per
        tuning device, each domain's adaptation and held-out batch in the device's order.
    """
    streams = TuningStreams(data, devices)
    return streams, [domain_batches(streams, device) for device in range(streams.num_devices)]


def run_sequences(method: str, elastic: ElasticMaster, compressed, sequences: Sequence[Sequence[DomainBatch]],
                  settings: RemodelSettings) -> dict[str, float]:
    """:func:`run_sequence` on each tuning device's sequence from the same start; the means over devices."""
    rows = [run_sequence(method, elastic, compressed, batches, settings) for batches in sequences]
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def run_sequence(method: str, elastic: ElasticMaster, compressed, batches: Sequence[DomainBatch],
                 settings: RemodelSettings) -> dict[str, float]:
    """Mean accuracy before/after adaptation over the sequence, and adaptation seconds per domain.

    ``elastic`` and ``compressed`` are copied first (the callers' models stay as they are).
    """
    elastic = copy.deepcopy(elastic)
    small = None
    if method in PRUNED_METHODS:
        small = copy.deepcopy(compressed) if compressed is not None else pruned_model(elastic, settings.keep_fraction)
    before, after, seconds = [], [], []
    for index, batch in enumerate(batches):
        serving, report = adapt_to_domain(method, elastic, small, batch.x, settings, seed=index)
        before.append(accuracy(report["before"], batch.held_x, batch.held_y))
        after.append(accuracy(serving, batch.held_x, batch.held_y))
        seconds.append(report["adapt_wall_s"])
    return {"before": float(np.mean(before)), "after": float(np.mean(after)), "seconds": float(np.mean(seconds))}


def grid(methods: Sequence[str], lrs: Sequence[float], epochs: Sequence[int]) -> list[tuple[str, float, int]]:
    """``(method, lr, epochs)`` to run: the whole grid per trained method, one point per untrained one."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    points = []
    for method in methods:
        if method in UNTUNED:
            points.append((method, lrs[0], epochs[0]))
        else:
            points.extend((method, lr, n) for lr in lrs for n in epochs)
    return points


def markdown(rows: Sequence[dict]) -> str:
    """One line per grid point; the best (lr, epochs) of each method in bold."""
    best = {}
    for row in rows:
        if row["method"] not in best or row["after"] > best[row["method"]]["after"]:
            best[row["method"]] = row
    lines = ["| method | lr | epochs | accuracy before (%) | after (%) | adapt s / domain |", "|---|---|---|---|---|---|"]
    for row in rows:
        mark = "**" if best[row["method"]] is row else ""
        lines.append(f"| {row['method']} | {row['lr']:g} | {row['epochs']} | {100 * row['before']:.1f} | "
                     f"{mark}{100 * row['after']:.1f}{mark} | {row['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the grid and print the table."""
    from experiments.claims.elastic import build_parser, shared_overrides

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--epochs", type=int, nargs="+", default=list(EPOCHS))
    parser.add_argument("--tune-devices", type=int, default=TUNE_DEVICES,
                        help="tuning devices (tune-0, ...) whose sequences the search averages over")
    parser.add_argument("overrides", nargs="*", default=shared_overrides(build_parser().parse_args([])),
                        help="Hydra overrides of the run (default: the claims preset's, sharing its caches)")
    args = parser.parse_args(argv)
    cfg = compose(args.overrides)
    torch.set_num_threads(cfg.engine.torch_threads)
    data, elastic = load_master(cfg)
    compressed = compressed_baseline(cfg, elastic, data) if cfg.algorithm.options.compress_epochs else None
    streams, sequences = tuning_sequences(data, args.tune_devices)
    print(f"searching on the {streams.describe()}", flush=True)
    opts = cfg.algorithm.options
    base = RemodelSettings(keep_fraction=opts.keep_fraction, mass=opts.mass, loss=opts.loss, batch_size=opts.batch_size)
    started, rows = time.perf_counter(), []
    for method, lr, epochs in grid(args.methods, args.lrs, args.epochs):
        settings = dataclasses.replace(base, lr=lr, epochs=epochs)
        rows.append({"method": method, "lr": lr, "epochs": epochs,
                     **run_sequences(method, elastic, compressed, sequences, settings)})
        print(f"{method} lr={lr:g} epochs={epochs}: {rows[-1]}", flush=True)
    print(f"\n{len(sequences[0])} domains on each of {streams.num_devices} tuning device(s), "
          f"{(time.perf_counter() - started) / 60:.1f} min; {streams.describe()}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
