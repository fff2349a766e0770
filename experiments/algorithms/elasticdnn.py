"""ElasticDNN (seed 003): on-device remodeling of an FBS-gated master into small surrogates, on evolving domains.

The plug-in hands ElasticDNN's strategy and client the master's pre-training (III-A), its cache
key, the devices' remodeling settings (``algorithm.elasticdnn.*``) and, for a same-size
baseline, the compressed model. The same-size baselines (``algorithm.elasticdnn.method`` in ``source``, ``bn_adapt``, ``tent``,
``shot``) adapt a compressed model: the paper compresses the pre-trained model "by removing
80% filters" and trains it offline for hours before the evaluation (seed 003, IV, "Offline
model pre-training"). :func:`compressed_baseline` keeps the master's largest-L1 filters
(:func:`models.elastic.remodel.pruned_model`) and fine-tunes that network on the proxy part
for ``algorithm.elasticdnn.compress_epochs`` epochs (0: pruned only, at chance on digits),
cached beside the master's pre-training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from flwr.app import ArrayRecord
from torch import nn

from clients.elastic import ElasticClient
from experiments.algorithms.plugin import EVOLVING, Algorithm
from experiments.data import to_tensor
from experiments.pretrain.cache import CloudTraining, atomic_save, pretrain_cache_path
from experiments.results.phase_progress import phase
from experiments.schema import ConfigError, RunConfig, config_hash
from experiments.validation import require
from models.elastic.bank import bank_thetas
from models.elastic.master import ElasticMaster
from models.elastic.modes import SHOT_LABEL_MODES
from models.elastic.pretrain import SANDWICH_MODES, pretrain_master
from models.elastic.remodel import METHODS, PRUNED_METHODS, pruned_model
from models.training import TrainSettings, accuracy, train_epochs
from strategies.elastic import ElasticDNN

logger = logging.getLogger(__name__)

#: The algorithm's name (its cloud training's cache key names it).
NAME = "elasticdnn"
#: Unsupervised losses of the surrogate's retraining (III-B; models/elastic/objective.py).
LOSSES = ("im", "tent", "feature_alignment")
#: Scenarios that bring a device a stream of domains.
DOMAIN_SCENARIOS = ("online", "evolving")


@dataclass(frozen=True)
class ElasticOptions:
    """ElasticDNN's own settings, ``algorithm.elasticdnn.*`` (seed 003, III-B and IV; ALGORITHMS.md)."""

    KEY: ClassVar[str] = "elasticdnn"

    method: str = "elasticdnn"  # elasticdnn | source | bn_adapt | tent | shot (same size) | full (whole master)
    keep_fraction: float = 0.2  # surrogate / pruned-baseline share of filters (IV: 80 % of filters removed)
    mass: float = 0.8  # trained filters cover this share of the BN-gradient scores (III-B)
    loss: str = "im"  # im (information maximisation, III-B default) | tent | feature_alignment
    epochs: int = 20  # passes over the domain's 100 samples (searched, python -m experiments.claims.elastic_tune; docs/RESULTS.md)
    lr: float = 3e-3  # SGD (searched on the tuning split: python -m experiments.claims.elastic_tune; SHOT's code: 1e-2)
    batch_size: int = 64  # SHOT digit code
    compress_epochs: int = 5  # same-size baselines: proxy fine-tuning of the pruned master (IV: compressed offline); 0 = none
    master_update: bool = True  # write surrogates' changes back (III-B3, eq. 3-4); false = the paper's ablation (IV)
    write_back_bn: bool = False  # also copy the kept filters' BN gamma/beta into the master; eq. 1-4 cover conv filters only (docs/RESULTS.md)
    sandwich: str = "both"  # master pre-training: both = also the full master and the smallest share every step (sandwich rule, models/elastic/pretrain.py) | largest | none
    bank_fedavg: bool = False  # extension beyond the paper: the cloud averages the devices' banks every round
    shot_labels: str = "eval"  # method=shot: pseudo-labels from running statistics (tim-learn/SHOT train_target: netF.eval() before obtain_label) | batch


def validate(cfg: RunConfig) -> None:
    """ElasticDNN's options, and the stream of domains it needs (two batches per domain)."""
    opts: ElasticOptions = cfg.algorithm.options
    key = "algorithm.elasticdnn"
    require(opts.method in METHODS, f"{key}.method", f"must be one of {METHODS}", opts.method)
    require(0 < opts.keep_fraction <= 1, f"{key}.keep_fraction", "must be in (0, 1]", opts.keep_fraction)
    require(0 < opts.mass <= 1, f"{key}.mass", "must be in (0, 1]", opts.mass)
    require(opts.loss in LOSSES, f"{key}.loss", f"must be one of {LOSSES}", opts.loss)
    require(opts.epochs >= 1, f"{key}.epochs", "must be >= 1", opts.epochs)
    require(opts.lr > 0, f"{key}.lr", "must be > 0", opts.lr)
    require(opts.batch_size >= 2, f"{key}.batch_size", "must be >= 2 (BatchNorm)", opts.batch_size)
    require(opts.sandwich in SANDWICH_MODES, f"{key}.sandwich", f"must be one of {SANDWICH_MODES}", opts.sandwich)
    require(opts.compress_epochs >= 0, f"{key}.compress_epochs", "must be >= 0 (0: no fine-tuning)",
            opts.compress_epochs)
    require(opts.shot_labels in SHOT_LABEL_MODES, f"{key}.shot_labels", f"must be one of {SHOT_LABEL_MODES}",
            opts.shot_labels)
    require(not opts.bank_fedavg or opts.method == NAME, f"{key}.bank_fedavg",
            f"averages ElasticDNN's banks: set {key}.method=elasticdnn or bank_fedavg=false", opts.method)
    require(not opts.bank_fedavg or opts.master_update, f"{key}.bank_fedavg",
            f"averages banks that only master updates change: set {key}.master_update=true", False)
    require(not opts.write_back_bn or opts.master_update, f"{key}.write_back_bn",
            f"is part of the master update: set {key}.master_update=true or write_back_bn=false", False)
    scen = cfg.scenario
    require(scen.name in DOMAIN_SCENARIOS, "scenario", "ElasticDNN needs a stream of domains: use scenario=evolving",
            scen.name)
    require(scen.batches_per_domain % 2 == 0, "scenario.batches_per_domain",
            "must be even for ElasticDNN (one batch to adapt on, one held out per domain)", scen.batches_per_domain)


def check_model(model: nn.Module) -> None:
    """ElasticDNN remodels an FBS-gated master with a domain-knowledge bank."""
    if not isinstance(model, ElasticMaster):
        raise ConfigError(
            f"algorithm={NAME} needs a master with a bank (model=elastic_fbs_resnet_cpu or "
            f"elastic_fbs_resnet56), got {type(model).__name__}; use model=auto"
        )


def cloud_training(cfg: RunConfig, model: ElasticMaster, x: torch.Tensor, y: torch.Tensor, data) -> None:
    """The offline master DNN constructor (III-A): CE + gate L1 + bank loss, random sparsity per step."""
    check_model(model)
    pre = cfg.pretrain
    with phase("ElasticDNN master and bank pre-training", total=pre.epochs, unit="epoch") as step:
        pretrain_master(model.master, model.bank, x, y, epochs=pre.epochs, lr=pre.lr, batch_size=pre.batch_size,
                        seed=cfg.seed, sandwich=cfg.algorithm.options.sandwich, on_epoch=step.epoch)


def training_key(cfg: RunConfig) -> dict:
    """Pre-training depends on none of the device-side options but ``sandwich``; the key marks the method."""
    return {"elastic_pretrain": "fbs+bank v2: sandwich, surrogate-shaped masks",
            "sandwich": cfg.algorithm.options.sandwich}


def client_options(cfg: RunConfig) -> dict:
    """The method and its remodeling settings on every device."""
    opts = cfg.algorithm.options
    return {
        "method": opts.method,
        "keep_fraction": opts.keep_fraction,
        "mass": opts.mass,
        "loss": opts.loss,
        "epochs": opts.epochs,
        "lr": opts.lr,
        "batch_size": opts.batch_size,
        "master_update": opts.master_update,
        "write_back_bn": opts.write_back_bn,
        "shot_labels": opts.shot_labels,
    }


def strategy_args(cfg: RunConfig, model: ElasticMaster, data) -> dict:
    """The compressed model for a same-size baseline; the pre-trained bank when banks are averaged."""
    opts = cfg.algorithm.options
    if opts.bank_fedavg:
        return {"bank": ArrayRecord(bank_thetas(model.bank))}
    if opts.method not in PRUNED_METHODS or opts.compress_epochs == 0:
        return {}
    return {"compressed": ArrayRecord(compressed_baseline(cfg, model, data).state_dict())}


def compressed_baseline(cfg: RunConfig, elastic: ElasticMaster, data) -> nn.Module:
    """The master's ``keep_fraction`` largest-L1 filters, fine-tuned on the proxy part (module docstring).

    Cross-entropy, Adam at ``pretrain.lr`` with the ``pretrain`` batch size and schedule, for
    ``algorithm.elasticdnn.compress_epochs`` epochs, seeded by ``seed``; cached next to the
    master's pre-training (:func:`compressed_cache_path`). ``elastic`` is left unchanged.
    """
    opts = cfg.algorithm.options
    small = pruned_model(elastic, opts.keep_fraction)
    path = compressed_cache_path(cfg)
    if path.exists():
        small.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("compressed same-size model loaded from %s", path)
        return small
    proxy_x, proxy_y = data.proxy()
    x, y = to_tensor(proxy_x), torch.as_tensor(proxy_y, dtype=torch.long)
    pre = cfg.pretrain
    settings = TrainSettings(epochs=opts.compress_epochs, lr=pre.lr, batch_size=pre.batch_size, schedule=pre.schedule)
    with phase("fine-tuning the compressed same-size model", total=opts.compress_epochs, unit="epoch") as step:
        train_epochs(small.train(), x, y, settings, seed=cfg.seed, on_epoch=step.epoch)
    logger.info("compressed model (%.0f %% of the filters) fine-tuned %d epochs: proxy accuracy %.3f",
                100 * opts.keep_fraction, opts.compress_epochs, accuracy(small, x, y))
    atomic_save(small.state_dict(), path)
    return small


def compressed_cache_path(cfg: RunConfig):
    """Where :func:`compressed_baseline` caches its model: the master's cache file, plus the compression key."""
    opts = cfg.algorithm.options
    master = pretrain_cache_path(cfg, CloudTraining(NAME, cloud_training, training_key(cfg)))
    key = config_hash({"keep_fraction": opts.keep_fraction, "compress_epochs": opts.compress_epochs})
    return master.with_name(f"{master.stem}-compressed-{key}.pt")


ALGORITHMS = (
    Algorithm(
        NAME,
        "ElasticDNN: on-device master/surrogate remodeling on evolving domains (or a same-size baseline)",
        ElasticDNN,
        ElasticClient,
        options=ElasticOptions,
        default_model="elastic_fbs_resnet_cpu",
        cloud_training=cloud_training,
        training_key=training_key,
        strategy_args=strategy_args,
        client_options=client_options,
        check_model=check_model,
        validate=validate,
        device_state=True,
        local_test=False,
        default_scenario=EVOLVING,
        baseline=f"algorithm={NAME} algorithm.{NAME}.method=tent",  # the same-size Tent of the paper's comparison (IV)
    ),
)
