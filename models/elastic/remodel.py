"""One target domain of ElasticDNN (seed 003, III-B) and its same-size baselines (IV).

:func:`remodel_for_domain` chains the paper's steps on a domain's unlabeled batch: hardest
sample -> gate relevance -> surrogate with the top ``keep_fraction`` filters (a physically
smaller network) -> retrain the filters covering ``mass`` of the BN-gradient scores ->
write the changes back into the master through the bank (eq. 3-4) and the BN parameters of
the kept filters. :func:`adapt_baseline` runs the comparison methods of the evaluation on a
model of the same size (a magnitude-pruned copy of the master) or, for ``full``, on the
whole master (the slow, accurate reference).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.batchnorm import bn_affine_parameters, reestimate_bn
from models.elastic.bank import update_bank_and_master
from models.elastic.footprint import optimizer_state_bytes
from models.elastic.ledger import counted_block
from models.elastic.master import ElasticMaster
from models.elastic.modes import MIN_BATCH, SHOT_LABEL_MODE
from models.elastic.retrain import (
    RETRAIN_BATCH_SIZE,
    RETRAIN_EPOCHS,
    RETRAIN_LR,
    adapt_full,
    retrain_surrogate,
)
from models.elastic.scores import FILTER_MASS
from models.elastic.surrogate import (
    SURROGATE_KEEP_FRACTION,
    clear_keep_masks,
    conv_parameter_count,
    extract_surrogate,
    generate_surrogate,
    magnitude_keep,
    surrogate_deltas,
    write_back_bn,
)
from models.losses import entropy_loss
from models.training import only_trainable

#: Methods of the evaluation (ElasticDNN IV): ElasticDNN itself, the same-size
#: baselines on a magnitude-pruned model, and the full master retrained with the same loss.
METHODS = ("elasticdnn", "source", "bn_adapt", "tent", "shot", "full")
#: Methods that run on the magnitude-pruned small model.
PRUNED_METHODS = ("source", "bn_adapt", "tent", "shot")
#: SGD momentum of the Tent baseline (DequanWang/tent ``conf.py``: ``OPTIM.MOMENTUM = 0.9``).
TENT_MOMENTUM = 0.9


@dataclass(frozen=True)
class RemodelSettings:
    """Knobs of one domain's adaptation (defaults: ElasticDNN III-B and SHOT's digit code).

    Attributes
    ----------
    keep_fraction : float
        Share of filters a surrogate (and the pruned baseline) keeps (ElasticDNN III-B3 and IV: 20 %).
    mass : float
        Trained filters cover this share of the BN-gradient scores (III-B: 80 %).
    loss : str
        Unsupervised loss of ElasticDNN and ``full``: ``im`` (default), ``tent``, ``feature_alignment``.
    epochs, lr, batch_size : int, float, int
        Passes over the domain's samples, SGD rate, mini-batch (models.elastic.retrain defaults).
    master_update : bool
        Write the surrogate's changes back into the master (III-B3, eq. 3-4). False is the
        paper's ablation "without updating" (IV): every surrogate then starts from the
        pre-trained master.
    write_back_bn : bool
        With ``master_update``, also copy the kept filters' BN gamma/beta into the master
        (:func:`models.elastic.surrogate.write_back_bn`). Eq. 1-4 update conv filters only and the
        paper is silent on BN; off by default, as measured on digits (docs/RESULTS.md: the
        surrogate's BN, trained with 80 % of each layer's filters gone, degraded the master).
    shot_labels : str
        How the ``shot`` baseline computes its pseudo-labels
        (:data:`~models.elastic.modes.SHOT_LABEL_MODES`; ``"eval"`` as SHOT).
    """

    keep_fraction: float = SURROGATE_KEEP_FRACTION
    mass: float = FILTER_MASS
    loss: str = "im"
    epochs: int = RETRAIN_EPOCHS
    lr: float = RETRAIN_LR
    batch_size: int = RETRAIN_BATCH_SIZE
    master_update: bool = True
    write_back_bn: bool = False
    shot_labels: str = SHOT_LABEL_MODE


def remodel_for_domain(elastic: ElasticMaster, x: Tensor, settings: RemodelSettings,
                       seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """ElasticDNN on one domain: surrogate, retraining, master update (III-B steps 1-3).

    Parameters
    ----------
    elastic : ElasticMaster
        The device's master and bank; updated in place (eq. 3-4, and the kept filters' BN
        with ``settings.write_back_bn``) unless ``settings.master_update`` is False.
    x : Tensor
        The domain's unlabeled samples (paper: 100).
    settings : RemodelSettings
    seed : int
        Mini-batch order of the retraining.

    Returns
    -------
    (nn.Module, dict)
        The retrained surrogate (serves this domain) and a report: ``model_fraction`` (conv
        weights of the surrogate / the master's), ``trained_fraction``, ``optimizer_state_bytes``,
        ``adapt_wall_s``, ``updated_layers``, ``surrogate_before`` (the untrained surrogate).
    """
    started = time.perf_counter()
    master = elastic.master
    clear_keep_masks(master)
    surrogate, keep, _ = generate_surrogate(master, x, settings.keep_fraction)
    _reestimate_bn_keeping_mode(surrogate, x)  # the master's statistics describe the full network on the source
    before = copy.deepcopy(surrogate)
    report = retrain_surrogate(surrogate, x, mass=settings.mass, loss=settings.loss, epochs=settings.epochs,
                               lr=settings.lr, batch_size=settings.batch_size, seed=seed)
    updated: tuple[str, ...] = ()
    if settings.master_update:
        with counted_block():  # eq. 3-4's matrix products, outside the network
            updated = update_bank_and_master(master, elastic.bank, surrogate_deltas(master, surrogate, keep))
        if settings.write_back_bn:
            write_back_bn(master, surrogate, keep)
    return surrogate, {
        "model_fraction": conv_parameter_count(surrogate) / conv_parameter_count(master),
        "trained_fraction": float(report["trained_fraction"]),
        "optimizer_state_bytes": int(report["optimizer_state_bytes"]),
        "adapt_wall_s": time.perf_counter() - started,
        "updated_layers": len(updated),
        "surrogate_before": before,
    }


def pruned_model(elastic: ElasticMaster, keep_fraction: float = SURROGATE_KEEP_FRACTION) -> nn.Module:
    """The same-size baseline model: the master's ``keep_fraction`` largest-L1 filters (IV, "80 % removed")."""
    clear_keep_masks(elastic.master)
    return extract_surrogate(elastic.master, magnitude_keep(elastic.master, keep_fraction))


def adapt_baseline(model: nn.Module, x: Tensor, method: str, settings: RemodelSettings,
                   seed: int = 0) -> dict[str, Any]:
    """Adapt ``model`` in place to one domain with a comparison method.

    ``source``: nothing. ``bn_adapt``: BN running statistics re-estimated on ``x`` (Schneider
    et al. 2020). ``tent``: entropy minimisation of BN affine parameters (Wang et al. 2021).
    ``shot``: SHOT (Liang et al. 2020), IM + pseudo-labels, every conv/BN trained, head frozen.
    ``full``: every filter of ``model`` (the whole master) retrained with ``settings.loss``.

    Returns
    -------
    dict
        ``trained_fraction``, ``optimizer_state_bytes`` (the momentum buffers the optimizer kept;
        0 for the methods that train nothing) and ``adapt_wall_s``.
    """
    if method not in METHODS or method == "elasticdnn":
        raise ValueError(f"unknown baseline {method!r}; choose one of {METHODS[1:]}")
    started = time.perf_counter()
    report: dict[str, Any] = {"trained_fraction": 0.0, "optimizer_state_bytes": 0}
    if method == "bn_adapt":
        _reestimate_bn_keeping_mode(model, x)
    elif method == "tent":
        report = _tent(model, x, settings, seed)
    elif method in ("shot", "full"):
        loss = "shot" if method == "shot" else settings.loss
        trained = adapt_full(model, x, loss=loss, epochs=settings.epochs, lr=settings.lr,
                             batch_size=settings.batch_size, seed=seed, shot_labels=settings.shot_labels)
        report = {"trained_fraction": float(trained["trained_fraction"]),
                  "optimizer_state_bytes": int(trained["optimizer_state_bytes"])}
    return {**report, "adapt_wall_s": time.perf_counter() - started}


def adapt_to_domain(method: str, elastic: ElasticMaster, small: nn.Module | None, x: Tensor,
                    settings: RemodelSettings, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """One domain of an evolving sequence with ``method`` (the device's step, without Flower).

    ``elasticdnn`` remodels the master (:func:`remodel_for_domain`, master and bank updated in
    place); ``full`` adapts the whole master; every other method adapts ``small`` (the
    same-size model, :data:`PRUNED_METHODS`) in place, continually across domains.

    Returns
    -------
    (nn.Module, dict)
        The model serving the domain and the report of the method, with ``model_fraction``
        (conv weights of the serving model / the master's) and ``before`` (the serving model
        as it was before this domain's adaptation, for the accuracy it would have had).
    """
    if method == "elasticdnn":
        surrogate, report = remodel_for_domain(elastic, x, settings, seed)
        report["before"] = report.pop("surrogate_before")
        return surrogate, report
    if method in PRUNED_METHODS and small is None:
        raise ValueError(f"method {method!r} adapts the same-size model: pass small (see pruned_model)")
    serving = elastic.master if method == "full" else small
    before = copy.deepcopy(serving)
    report = adapt_baseline(serving, x, method, settings, seed)
    report["model_fraction"] = conv_parameter_count(serving) / conv_parameter_count(elastic.master)
    report["before"] = before
    return serving, report


def _reestimate_bn_keeping_mode(model: nn.Module, x: Tensor) -> None:
    """BN statistics of ``x`` in one pass (:func:`models.batchnorm.reestimate_bn`); ``model``'s mode kept.

    Used by ``bn_adapt`` and on every fresh surrogate: a surrogate's BN layers see different
    inputs than in the full master (dropped channels), so it starts from statistics of the
    domain's unlabeled batch (an unsupervised step, part of the remodeling here; the paper is
    silent on BN statistics).
    """
    was_training = model.training
    reestimate_bn(model, x)
    model.train(was_training)


def _tent(model: nn.Module, x: Tensor, settings: RemodelSettings, seed: int) -> dict[str, Any]:
    """Tent: SGD on the BN affine parameters minimising prediction entropy, BN in batch mode."""
    affine = bn_affine_parameters(model)
    optimizer = torch.optim.SGD(affine, lr=settings.lr, momentum=TENT_MOMENTUM)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    with only_trainable(model, affine):
        for _ in range(settings.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), settings.batch_size):
                idx = order[start : start + settings.batch_size]
                if len(idx) < MIN_BATCH:
                    continue
                optimizer.zero_grad()
                entropy_loss(model(x[idx])).backward()
                optimizer.step()
    model.train(was_training)
    for p in model.parameters():
        p.grad = None
    trained = sum(p.numel() for p in affine)
    total = sum(p.numel() for p in model.parameters())
    return {"trained_fraction": trained / total, "optimizer_state_bytes": optimizer_state_bytes(optimizer)}
