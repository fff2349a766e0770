"""AN (ECLM 7.1, AdaptiveNet-style): a multi-branch supernet pre-trained in the cloud; each device picks
the best branch combination that fits its budget and fine-tunes it, with no aggregation."""

from __future__ import annotations

import torch
from torch import nn

from clients.an import AdaptiveNetClient
from experiments.algorithms.plugin import Algorithm
from experiments.schema import ConfigError, RunConfig
from models.multibranch.net import MultiBranchNet
from models.multibranch.training import train_supernet
from models.training import TrainSettings
from strategies.an import AdaptiveNet


def check_model(model: nn.Module) -> None:
    """AN needs a multi-branch supernet; say how to get one."""
    if not isinstance(model, MultiBranchNet):
        raise ConfigError("algorithm an needs a multi-branch supernet: set model=multibranch_cnn (or multibranch_resnet18)")


def cloud_training(cfg: RunConfig, model: MultiBranchNet, x: torch.Tensor, y: torch.Tensor, data) -> None:
    """Pre-train the supernet on the proxy part with the sandwich rule (models/multibranch/training.py)."""
    check_model(model)
    pre = cfg.pretrain
    train_supernet(model, x, y, TrainSettings(pre.epochs, pre.lr, pre.batch_size, "adam", schedule=pre.schedule), cfg.seed)


def strategy_args(cfg: RunConfig, model: nn.Module, data) -> dict:
    """The per-round compute allowance devices choose their path within (the round deadline)."""
    return {"compute_budget_s": cfg.fleet.deadline_s}


ALGORITHMS = (
    Algorithm(
        "an",
        "AN: AdaptiveNet-style supernet, on-device branch choice, no aggregation (ECLM 7.1)",
        AdaptiveNet,
        AdaptiveNetClient,
        default_model="multibranch_cnn",
        cloud_training=cloud_training,
        strategy_args=strategy_args,
        check_model=check_model,
    ),
)
