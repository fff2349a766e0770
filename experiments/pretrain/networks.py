"""The run's network, built the same way by the cloud and by every device."""

from __future__ import annotations

import torch
from torch import nn

from experiments.schema import ConfigError, ModelConfig
from models.catalog import build_model, model_names

#: ModelConfig fields that are family options, and the factory keyword each maps to.
FAMILY_OPTIONS = {"top_k": "k", "modules_per_layer": "modules_per_layer", "shrink": "shrink"}


def model_options(model: ModelConfig) -> dict:
    """Family options that are set (None keeps the family's own default)."""
    return {kw: getattr(model, field) for field, kw in FAMILY_OPTIONS.items() if getattr(model, field) is not None}


def check_model_name(model: ModelConfig) -> None:
    """``model.name`` must be a network of :mod:`models.catalog` (after ``auto`` was resolved)."""
    if model.name not in model_names():
        raise ConfigError(f"unknown model.name {model.name!r}; choose one of {list(model_names())}")


def build_run_model(model: ModelConfig, num_classes: int, in_channels: int, *, seed: int = 0) -> nn.Module:
    """A fresh instance of the configured network, its initial weights drawn from ``seed``.

    The draw uses a forked RNG seeded with ``seed`` (the run's seed), so the initial weights,
    and hence the pre-trained model and every number after it, are the same in every process
    (torch seeds its default generator differently per process) and no other draw moves.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(
            model.name, num_classes=num_classes, width=model.width, in_channels=in_channels, **model_options(model)
        )
