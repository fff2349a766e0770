"""Cloud pre-training on the proxy part, cached on disk by config hash.

Sweeps over algorithms or fleet settings reuse one pre-trained model: the cache key
covers only what changes the proxy data and the training (dataset, model, pre-training
settings, seed), never the algorithm or the fleet.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from experiments.algorithms import ALGORITHMS
from experiments.config import RunConfig, config_hash
from models.training import TrainSettings, accuracy, train_epochs

logger = logging.getLogger(__name__)


def pretrain_cache_path(cfg: RunConfig) -> Path:
    """Where the pre-trained weights for ``cfg`` live.

    The key covers the dataset (not its partition), the model, the pre-training settings,
    the seed and, for an algorithm with its own cloud training, its name and the options
    that shape that training.
    """
    algorithm = ALGORITHMS[cfg.algorithm.name]
    dataset = dataclasses.replace(cfg.dataset, partition=None)  # partitions do not touch the proxy
    pretrain = dataclasses.replace(cfg.pretrain, cache_dir="")
    training = {"cloud_training": algorithm.name, **algorithm.training_key(cfg)} if algorithm.cloud_training else {}
    key = config_hash(dataset, cfg.model, pretrain, {"seed": cfg.seed}, training)
    return Path(cfg.pretrain.cache_dir).expanduser() / f"pretrain-{cfg.dataset.name}-{cfg.model.name}-{key}.pt"


def pretrained_model(cfg: RunConfig, model: nn.Module, proxy_x: torch.Tensor, proxy_y: torch.Tensor, data) -> nn.Module:
    """Load ``model``'s pre-trained weights from the cache, training and caching them if absent.

    The algorithm's own cloud training runs if it has one (e.g. ECLM 4.3), else plain
    supervised training on the proxy part.
    """
    path = pretrain_cache_path(cfg)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("pre-trained cloud model loaded from %s", path)
        return model
    algorithm = ALGORITHMS[cfg.algorithm.name]
    if algorithm.cloud_training is not None:
        algorithm.cloud_training(cfg, model, proxy_x, proxy_y, data)
        logger.info("%s cloud training: proxy accuracy %.3f", algorithm.name, accuracy(model, proxy_x, proxy_y))
        _atomic_save(model.state_dict(), path)
        return model
    settings = TrainSettings(
        epochs=cfg.pretrain.epochs,
        lr=cfg.pretrain.lr,
        batch_size=cfg.pretrain.batch_size,
        optimizer="adam",
        schedule=cfg.pretrain.schedule,
    )
    train_epochs(model, proxy_x, proxy_y, settings, seed=cfg.seed)
    logger.info("pre-trained on %d proxy samples: proxy accuracy %.3f", len(proxy_y), accuracy(model, proxy_x, proxy_y))
    _atomic_save(model.state_dict(), path)
    return model


def _atomic_save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
