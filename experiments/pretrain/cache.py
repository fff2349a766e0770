"""Cloud pre-training on the proxy part, cached on disk by config hash.

Sweeps over algorithms or fleet settings reuse one pre-trained model: the cache key
covers only what changes the proxy data and the training (dataset, model, pre-training
settings, seed), never the algorithm or the fleet. A network given ``model.checkpoint``
(a user's state dict file, e.g. torchvision ImageNet weights for ImageNet-C) is loaded
from it instead: no training, no cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from experiments.algorithms.registry import ALGORITHMS
from experiments.config import ConfigError, RunConfig, config_hash, to_dict
from models.training import TrainSettings, accuracy, train_epochs
from models.tv_resnet import load_checkpoint

logger = logging.getLogger(__name__)


def proxy_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's proxy part (``data.proxy()``) as model-ready image and label tensors."""
    from experiments.data import to_tensor

    x, y = data.proxy()
    return to_tensor(x), torch.as_tensor(y, dtype=torch.long)


def pretrain_cache_path(cfg: RunConfig) -> Path:
    """Where the pre-trained weights for ``cfg`` live.

    The key covers the dataset (not its partition), the model, the pre-training settings,
    the seed and, for an algorithm with its own cloud training, its name and the options
    that shape that training.
    """
    algorithm = ALGORITHMS[cfg.algorithm.name]
    dataset = to_dict(dataclasses.replace(cfg.dataset, partition=None))  # partitions do not touch the proxy
    del dataset["cache_dir"]  # where partitions are cached changes no weight (and keeps older keys)
    model = {k: v for k, v in to_dict(cfg.model).items() if k != "checkpoint"}  # checkpoint runs skip the cache
    pretrain = dataclasses.replace(cfg.pretrain, cache_dir="")
    training = {"cloud_training": algorithm.name, **algorithm.training_key(cfg)} if algorithm.cloud_training else {}
    key = config_hash(dataset, model, pretrain, {"seed": cfg.seed}, training)
    return Path(cfg.pretrain.cache_dir).expanduser() / f"pretrain-{cfg.dataset.name}-{cfg.model.name}-{key}.pt"


def pretrained_model(cfg: RunConfig, model: nn.Module, data, proxy: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> nn.Module:
    """Load ``model``'s pre-trained weights from the cache, training and caching them if absent.

    The algorithm's own cloud training runs if it has one (e.g. ECLM 4.3), else plain
    supervised training on the proxy part. With ``cfg.model.checkpoint`` set, the weights
    come from that file instead (:func:`checkpoint_model`). ``proxy`` is the proxy part as
    tensors; by default :func:`proxy_tensors` renders it from ``data``, and only when
    training runs (a cached model costs no rendering: issue 7, start-up).
    """
    if cfg.model.checkpoint is not None:
        return checkpoint_model(cfg, model)
    path = pretrain_cache_path(cfg)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("pre-trained cloud model loaded from %s", path)
        return model
    proxy_x, proxy_y = proxy_tensors(data) if proxy is None else proxy
    algorithm = ALGORITHMS[cfg.algorithm.name]
    if algorithm.cloud_training is not None:
        algorithm.cloud_training(cfg, model, proxy_x, proxy_y, data)
        logger.info("%s cloud training: proxy accuracy %.3f", algorithm.name, accuracy(model, proxy_x, proxy_y))
        atomic_save(model.state_dict(), path)
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
    atomic_save(model.state_dict(), path)
    return model


def checkpoint_model(cfg: RunConfig, model: nn.Module) -> nn.Module:
    """Load ``model`` from the user's state dict file ``cfg.model.checkpoint`` (strict).

    Raises
    ------
    ValueError
        ``ConfigError`` naming the keys to fix when the file is missing or does not fit.
    """
    try:
        load_checkpoint(model, cfg.model.checkpoint)
    except ValueError as error:
        raise ConfigError(
            f"{error}; set model.checkpoint (or algorithm.cema.foundation_checkpoint for CEMA's "
            f"foundation) to a state dict file of {cfg.model.name}"
        ) from None
    logger.info("%s loaded from checkpoint %s (no pre-training)", cfg.model.name, cfg.model.checkpoint)
    return model


def atomic_save(state: dict, path: Path) -> None:
    """``torch.save(state, path)`` through a temporary file and one rename (a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
