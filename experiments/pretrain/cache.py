"""Cloud pre-training on the proxy part, cached on disk by config hash.

Sweeps over algorithms or fleet settings reuse one pre-trained model: the cache key
covers only what changes the proxy data and the training (dataset, model, pre-training
settings, seed, and an algorithm's own cloud training when it has one: :class:`CloudTraining`),
never the fleet. A network given ``model.checkpoint`` (a user's state dict file, e.g.
torchvision ImageNet weights for ImageNet-C) is loaded from it instead: no training, no cache.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.data import to_tensor
from experiments.results.atomic import write_atomically
from experiments.results.phase_progress import phase
from experiments.schema import ConfigError, RunConfig, config_hash, to_dict
from models.training import TrainSettings, accuracy, train_epochs
from models.tv_resnet import load_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudTraining:
    """An algorithm's own training of the cloud model on the proxy part (e.g. ECLM 4.3).

    Attributes
    ----------
    name : str
        The algorithm's name (part of the cache key).
    train : callable
        ``(cfg, model, proxy_x, proxy_y, data) -> None``; trains ``model`` in place.
    key : mapping
        The settings that shape the training (part of the cache key).
    """

    name: str
    train: Callable[..., None]
    key: Mapping[str, Any]


#: How the initial weights are drawn, part of the cache key: "seeded" from the run seed
#: (:func:`experiments.pretrain.networks.build_run_model`); weights cached before were drawn
#: from each process's own generator and are not reused.
INIT = "seeded"


def proxy_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's proxy part (``data.proxy()``) as model-ready image and label tensors."""
    x, y = data.proxy()
    return to_tensor(x), torch.as_tensor(y, dtype=torch.long)


def pretrain_cache_path(cfg: RunConfig, training: CloudTraining | None = None) -> Path:
    """Where the pre-trained weights for ``cfg`` live.

    The key covers the dataset (not its partition), the model, the pre-training settings,
    the seed and, for an algorithm's own cloud ``training``, its name and the settings that
    shape it.
    """
    dataset = to_dict(dataclasses.replace(cfg.dataset, partition=None))  # partitions do not touch the proxy
    del dataset["cache_dir"]  # where partitions are cached changes no weight (and keeps older keys)
    model = {k: v for k, v in to_dict(cfg.model).items() if k != "checkpoint"}  # checkpoint runs skip the cache
    pretrain = dataclasses.replace(cfg.pretrain, cache_dir="")
    trained_by = {} if training is None else {"cloud_training": training.name, **training.key}
    key = config_hash(dataset, model, pretrain, {"seed": cfg.seed, "init": INIT}, trained_by)
    return Path(cfg.pretrain.cache_dir).expanduser() / f"pretrain-{cfg.dataset.name}-{cfg.model.name}-{key}.pt"


def pretrained_model(cfg: RunConfig, model: nn.Module, data, training: CloudTraining | None = None,
                     proxy: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """Load ``model``'s pre-trained weights from the cache, training and caching them if absent.

    The algorithm's own cloud ``training`` runs if it has one (e.g. ECLM 4.3), else plain
    supervised training on the proxy part. With ``cfg.model.checkpoint`` set, the weights
    come from that file instead (:func:`checkpoint_model`). ``proxy`` is the proxy part as
    tensors; by default :func:`proxy_tensors` renders it from ``data``, and only when
    training runs (a cached model costs no rendering at start-up).
    """
    if cfg.model.checkpoint is not None:
        return checkpoint_model(cfg, model)
    path = pretrain_cache_path(cfg, training)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("pre-trained cloud model loaded from %s", path)
        return model
    if proxy is None:
        with phase("rendering the proxy part for the cloud"):
            proxy = proxy_tensors(data)
    proxy_x, proxy_y = proxy
    if training is not None:
        training.train(cfg, model, proxy_x, proxy_y, data)
        logger.info("%s cloud training: proxy accuracy %.3f", training.name, accuracy(model, proxy_x, proxy_y))
    else:
        pretrain(cfg, model, proxy_x, proxy_y)
        logger.info("pre-trained on %d proxy samples: proxy accuracy %.3f", len(proxy_y),
                    accuracy(model, proxy_x, proxy_y))
    atomic_save(model.state_dict(), path)
    return model


def pretrain(cfg: RunConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Plain supervised pre-training of ``model`` in place on ``(x, y)`` with ``cfg.pretrain``'s settings.

    Adam, ``pretrain.epochs`` epochs seeded by the run seed; each epoch shows as a step of
    a progress phase (:func:`~experiments.results.phase_progress.phase`).
    """
    pre = cfg.pretrain
    settings = TrainSettings(epochs=pre.epochs, lr=pre.lr, batch_size=pre.batch_size, optimizer="adam",
                             schedule=pre.schedule)
    with phase(f"pre-training {cfg.model.name} on {len(y)} proxy samples", total=pre.epochs, unit="epoch") as step:
        train_epochs(model, x, y, settings, seed=cfg.seed, on_epoch=step.epoch)


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
            f"{error}; set model.checkpoint (or the algorithm's own checkpoint key for a network of its "
            f"own, e.g. CEMA's foundation) to a state dict file of {cfg.model.name}"
        ) from None
    logger.info("%s loaded from checkpoint %s (no pre-training)", cfg.model.name, cfg.model.checkpoint)
    return model


def atomic_save(state: dict, path: Path) -> None:
    """``torch.save(state, path)`` in one atomic replace (:func:`~experiments.results.atomic.write_atomically`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda handle: torch.save(state, handle))
