"""What the apps hand CEMA and the online TTA baselines: the foundation model, preprocessing, device options."""

from __future__ import annotations

import dataclasses
import functools

from torch import nn

from experiments.config import RunConfig
from experiments.data import to_tensor
from experiments.networks import build_run_model


def foundation_config(cfg: RunConfig) -> RunConfig:
    """The run config of the cloud's foundation model (its pre-training is cached like any other,
    or skipped when ``algorithm.cema.foundation_checkpoint`` names its weights file)."""
    options = cfg.algorithm.cema
    model = dataclasses.replace(
        cfg.model, name=options.foundation_model, width=options.foundation_width, top_k=None,
        modules_per_layer=None, shrink=None, checkpoint=options.foundation_checkpoint,
    )
    return dataclasses.replace(cfg, model=model)


def strategy_args(cfg: RunConfig, model: nn.Module, data) -> dict:
    """CEMA's cloud: a pre-trained foundation model, the edge model's factory, preprocessing."""
    from experiments.pretrain import pretrained_model  # the registry imports this module

    fcfg = foundation_config(cfg)
    foundation = build_run_model(fcfg.model, data.num_classes, data.image_shape[0])
    foundation = pretrained_model(fcfg, foundation, data)
    return {
        "foundation": foundation,
        "edge_factory": functools.partial(build_run_model, cfg.model, data.num_classes, data.image_shape[0]),
        "preprocess": to_tensor,
        "num_classes": data.num_classes,
        "send": cfg.algorithm.cema.send,
        "replay_capacity": cfg.algorithm.cema.replay_capacity,
        "edge_models": cfg.algorithm.cema.edge_models,
    }


def client_options(cfg: RunConfig) -> dict:
    """The upload filter's settings on every device."""
    options = cfg.algorithm.cema
    return {
        "e_max_fraction": options.e_max,
        "e_min_fraction": options.e_min,
        "threshold_coeff": options.threshold_coeff,
        "warmup_samples": options.warmup_samples,
        "edge_bn": options.edge_bn,
    }


def tta_options(method: str):
    """Device options of an on-device TTA baseline (its adapter name)."""
    return lambda cfg: {"method": method}
