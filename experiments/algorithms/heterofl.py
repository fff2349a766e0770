"""What the apps hand HeteroFL and FedRolex: cloud training at every width, options, a model check."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from experiments.config import ConfigError, RunConfig
from experiments.pretrain.networks import build_run_model
from models.training import TrainSettings, train_epochs
from models.width.submodel import SubModelUpdate, covering_average, extract
from models.width.layers import check_width_scalable, scaled_model, static_batch_norm


def check_model(model: nn.Module) -> None:
    """HeteroFL cuts every conv/linear to a channel prefix; refuse networks it cannot cut."""
    try:
        check_width_scalable(model)
    except ValueError as exc:
        raise ConfigError(f"heterofl/fedrolex cannot width-scale this model ({exc}); use model=cnn or resnet18") from exc


def training_key(cfg: RunConfig) -> dict:
    """What shapes the cloud training (for the pre-training cache key)."""
    return {"rates": list(cfg.algorithm.heterofl.rates), "multirate_epochs": cfg.algorithm.heterofl.multirate_epochs}


def strategy_args(cfg: RunConfig, model: nn.Module, data) -> dict:
    """Constructor arguments of :class:`strategies.heterofl.HeteroFL` from ``algorithm.heterofl``."""
    options = dataclasses.asdict(cfg.algorithm.heterofl)
    options.pop("multirate_epochs")
    if options["round_budget_s"] is None and cfg.fleet.deadline_s is not None:
        options["round_budget_s"] = cfg.fleet.deadline_s
    return options


def cloud_training(cfg: RunConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, data) -> None:
    """Pre-train the full model, then train it at every width rate, smallest first.

    HeteroFL trains all widths jointly from scratch; a cloud model trained only at full
    width collapses when cut to a prefix. ``algorithm.heterofl.multirate_epochs`` passes
    over the rates (each rate's prefix sub-model trained 1 epoch from the same state, then
    all averaged per element over the rates that cover it, as in a HeteroFL round) make
    the pre-trained model sliceable; static BN recomputes the full model's statistics on
    the proxy part at the end.
    """
    check_model(model)
    pre = cfg.pretrain
    train_epochs(model, x, y, TrainSettings(pre.epochs, pre.lr, pre.batch_size, "adam", schedule=pre.schedule), cfg.seed)
    factory = lambda: build_run_model(cfg.model, data.num_classes, data.image_shape[0])  # noqa: E731
    fine = TrainSettings(1, pre.lr / 3, pre.batch_size, "adam")
    rates = sorted(cfg.algorithm.heterofl.rates)
    for epoch in range(cfg.algorithm.heterofl.multirate_epochs):
        state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        updates = []
        for step, rate in enumerate(rates):  # one "client" per rate, averaged like a HeteroFL round
            sub = scaled_model(factory, rate)
            sub.load_state_dict({k: torch.from_numpy(v) for k, v in extract(state, rate).items()})
            train_epochs(sub, x, y, fine, seed=cfg.seed * 1000 + epoch * 10 + step)
            updates.append(SubModelUpdate({k: v.detach().numpy() for k, v in sub.state_dict().items()}, rate))
        merged = covering_average(state, updates)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})
    static_batch_norm(model, x, pre.batch_size)
