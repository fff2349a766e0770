"""What the apps hand HeteroFL and FedRolex: their options and a width-scalability check."""

from __future__ import annotations

import dataclasses

from torch import nn

from experiments.config import ConfigError, RunConfig
from models.width import check_width_scalable


def check_model(model: nn.Module) -> None:
    """HeteroFL cuts every conv/linear to a channel prefix; refuse networks it cannot cut."""
    try:
        check_width_scalable(model)
    except ValueError as exc:
        raise ConfigError(f"heterofl/fedrolex cannot width-scale this model ({exc}); use model=cnn or resnet18") from exc


def strategy_args(cfg: RunConfig, model: nn.Module, data) -> dict:
    """Constructor arguments of :class:`strategies.heterofl.HeteroFL` from ``algorithm.heterofl``."""
    options = dataclasses.asdict(cfg.algorithm.heterofl)
    if options["round_budget_s"] is None and cfg.fleet.deadline_s is not None:
        options["round_budget_s"] = cfg.fleet.deadline_s
    return options
