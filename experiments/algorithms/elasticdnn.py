"""What the apps hand ElasticDNN: the master's pre-training, its cache key, device options.

The same-size baselines (``algorithm.elasticdnn.method`` in ``source``, ``bn_adapt``, ``tent``,
``shot``) adapt a compressed model: the paper compresses the pre-trained model "by removing
80% filters" and trains it offline for hours before the evaluation (seed 003, IV, "Offline
model pre-training"). :func:`compressed_baseline` keeps the master's largest-L1 filters
(:func:`models.elastic.remodel.pruned_model`) and fine-tunes that network on the proxy part
for ``algorithm.elasticdnn.compress_epochs`` epochs (0: pruned only, at chance on digits),
cached beside the master's pre-training.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord
from torch import nn

from experiments.config import RunConfig, config_hash
from experiments.data import to_tensor
from experiments.validation import ConfigError
from models.elastic.master import ElasticMaster
from models.elastic.remodel import PRUNED_METHODS, pruned_model
from models.elastic.bank import bank_thetas
from models.elastic.pretrain import pretrain_master
from models.training import TrainSettings, accuracy, train_epochs

logger = logging.getLogger(__name__)


def check_model(model: nn.Module) -> None:
    """ElasticDNN remodels an FBS-gated master with a domain-knowledge bank."""
    if not isinstance(model, ElasticMaster):
        raise ConfigError(
            f"algorithm=elasticdnn needs a master with a bank (model=elastic_fbs_resnet_cpu or "
            f"elastic_fbs_resnet56), got {type(model).__name__}; use model=auto"
        )


def cloud_training(cfg: RunConfig, model: ElasticMaster, x: torch.Tensor, y: torch.Tensor, data) -> None:
    """The offline master DNN constructor (III-A): CE + gate L1 + bank loss, random sparsity per step."""
    check_model(model)
    pre = cfg.pretrain
    pretrain_master(model.master, model.bank, x, y, epochs=pre.epochs, lr=pre.lr, batch_size=pre.batch_size,
                    seed=cfg.seed, sandwich=cfg.algorithm.elasticdnn.sandwich)


def training_key(cfg: RunConfig) -> dict:
    """Pre-training depends on none of the device-side options but ``sandwich``; the key marks the method."""
    return {"elastic_pretrain": "fbs+bank v2: sandwich, surrogate-shaped masks",
            "sandwich": cfg.algorithm.elasticdnn.sandwich}


def client_options(cfg: RunConfig) -> dict:
    """The method and its remodeling settings on every device."""
    opts = cfg.algorithm.elasticdnn
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
    opts = cfg.algorithm.elasticdnn
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
    from experiments.pretrain.cache import atomic_save  # the registry imports this module

    opts = cfg.algorithm.elasticdnn
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
    train_epochs(small.train(), x, y, settings, seed=cfg.seed)
    logger.info("compressed model (%.0f %% of the filters) fine-tuned %d epochs: proxy accuracy %.3f",
                100 * opts.keep_fraction, opts.compress_epochs, accuracy(small, x, y))
    atomic_save(small.state_dict(), path)
    return small


def compressed_cache_path(cfg: RunConfig):
    """Where :func:`compressed_baseline` caches its model: the master's cache file, plus the compression key."""
    from experiments.pretrain.cache import pretrain_cache_path

    opts = cfg.algorithm.elasticdnn
    master = pretrain_cache_path(cfg)
    key = config_hash({"keep_fraction": opts.keep_fraction, "compress_epochs": opts.compress_epochs})
    return master.with_name(f"{master.stem}-compressed-{key}.pt")
