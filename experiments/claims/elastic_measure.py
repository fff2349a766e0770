"""The multi-application comparison's measurements: every domain at every surrogate size (seed 003, III-C).

On the run's pre-trained master (loaded from the pre-training cache the runs used), for every
domain of one device's evolving sequence and every candidate surrogate size (keep fraction):
remodel + retrain on the domain's unlabeled batch (:func:`models.elastic.remodel.remodel_for_domain`),
the surrogate's accuracy before and after retraining on the domain's held-out batch, the measured
wall time T (this host), the FLOPs of the work it ran (counted by torch,
:class:`models.elastic.ledger.PassLedger`), and the master's mean penultimate features of the batch.
Every measurement starts from the same pre-trained master (the apps' masters do not evolve here).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from experiments.algorithms import ALGORITHMS
from experiments.data import build_federated_data, to_tensor
from experiments.pretrain.cache import pretrained_model
from experiments.pretrain.networks import build_run_model
from experiments.schema import RunConfig
from models.elastic.ledger import PassLedger
from models.elastic.master import ElasticMaster
from models.elastic.remodel import RemodelSettings, remodel_for_domain
from models.training import accuracy


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
        (D, C) FLOPs of that work, counted by torch on the executed passes.
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
    """Before/after accuracy, wall seconds and counted FLOPs of one domain at every size (fresh master copy each).

    Returns
    -------
    tuple of np.ndarray
        ``(before, after, seconds, flops)``, each (C,).
    """
    rows = []
    for size in sizes:
        master_copy = copy.deepcopy(elastic)
        ledger = PassLedger()
        with ledger.recording():
            surrogate, report = remodel_for_domain(master_copy, batch.x,
                                                   dataclasses.replace(settings, keep_fraction=size), seed)
        with torch.no_grad():
            before = accuracy(report["surrogate_before"], batch.held_x, batch.held_y)
            after = accuracy(surrogate, batch.held_x, batch.held_y)
        rows.append((before, after, report["adapt_wall_s"], ledger.flops()))
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


def load_master(cfg: RunConfig):
    """The run's data and its pre-trained ElasticMaster (from the pre-training cache the runs filled)."""
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
    if not isinstance(model, ElasticMaster):
        raise ValueError(f"model {cfg.model.name} is not an ElasticDNN master; pass an algorithm=elasticdnn run")
    model = pretrained_model(cfg, model, data, ALGORITHMS[cfg.algorithm.name].pretraining(cfg))
    return data, model
