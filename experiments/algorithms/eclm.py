"""What the apps hand ECLM: cloud training, the module catalogue, device options.

ECLM's strategy and client are pure algorithm code; this module turns the run config and
the cloud's network into what they need (ARCHITECTURE.md: the apps in ``experiments/``
hand strategies and clients their inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from experiments.config import ConfigError, RunConfig
from models.eclm.ability import define_subtasks, fixed_subtasks
from models.eclm.training import AbilitySettings, train_ability, train_end_to_end
from models.eclm.modular import ModularNet, parse_module_id
from models.training import TrainSettings
from strategies.eclm import ModuleCatalog

#: The ability-enhancing fine-tuning runs at the pre-training rate divided by this (assumption:
#: ECLM 4.3 gives no rate; a fine-tuning step is gentler than the end-to-end training).
ABILITY_LR_DIVISOR = 3

#: ECLM options that change the cloud's pre-trained model (the pre-training cache key).
TRAINING_OPTIONS = (
    "load_balance_weight", "ability_epochs", "subtasks", "subtask_size", "kappa1", "kappa2", "kl_weight",
    "ability_load_balance",
)


def check_model(model: nn.Module) -> None:
    """ECLM needs a modular network; say how to get one."""
    if not isinstance(model, ModularNet):
        raise ConfigError(
            "algorithm eclm needs a modular network: set model=modular_resnet18 (or modular_mlp, "
            "modular_vgg16, modular_resnet34)"
        )


def training_key(cfg: RunConfig) -> dict[str, Any]:
    """What of the config shapes ECLM's cloud training (for the pre-training cache key)."""
    options = dataclasses.asdict(cfg.algorithm.eclm)
    key = {name: options[name] for name in TRAINING_OPTIONS}
    if cfg.algorithm.eclm.subtasks == "cooccurrence":
        key["partition"] = dataclasses.asdict(cfg.dataset.partition)
        key["devices"] = cfg.fleet.devices
    return key


def subtasks_for(cfg: RunConfig, data, num_classes: int) -> list[tuple[int, ...]]:
    """ECLM 4.3 step 1: sub-tasks = classes that co-occur on devices, or fixed groups.

    Co-occurrence stands in for the federated data analysis the paper points to
    (footnote 4): the simulator reads each device's class set from its partition.
    """
    options = cfg.algorithm.eclm
    if options.subtasks == "fixed":
        return fixed_subtasks(num_classes, options.subtask_size)
    class_sets = []
    for pid in range(cfg.fleet.devices):
        plan, _ = data.device_plan(pid, 0)
        class_sets.append(sorted(set(np.asarray(data.pool_labels[plan.rows]).tolist())))
    return define_subtasks(class_sets, num_classes, options.subtask_size)


def cloud_training(cfg: RunConfig, model: ModularNet, x: torch.Tensor, y: torch.Tensor, data) -> None:
    """ECLM 4.3 on the proxy part: end-to-end (CE + load balance), then ability-enhancing."""
    check_model(model)
    options = cfg.algorithm.eclm
    model.balance_weight = options.load_balance_weight
    pre = cfg.pretrain
    settings = TrainSettings(pre.epochs, pre.lr, pre.batch_size, "adam", schedule=pre.schedule)
    train_end_to_end(model, x, y, settings, cfg.seed)
    if options.ability_epochs > 0:
        subtasks = subtasks_for(cfg, data, data.num_classes)
        ability = AbilitySettings(
            options.ability_epochs, options.kappa1, options.kappa2, options.kl_weight, options.ability_load_balance
        )
        fine = TrainSettings(options.ability_epochs, pre.lr / ABILITY_LR_DIVISOR, pre.batch_size, "adam")
        train_ability(model, x, y, subtasks, data.num_classes, fine, ability, cfg.seed)


def catalog(model: ModularNet, batch_size: int) -> ModuleCatalog:
    """Module costs of the cloud network, measured once (ECLM 5.1: known in advance)."""
    costs = {mid: c.as_tuple() for mid, c in model.module_costs(batch_size).items()}
    layer_of = {mid: parse_module_id(mid)[0] for mid in costs}
    return ModuleCatalog(layer_of=layer_of, costs=costs, shared_cost=model.shared_cost(batch_size).as_tuple())


def strategy_args(cfg: RunConfig, model: nn.Module, data) -> dict[str, Any]:
    """Keyword arguments of :class:`strategies.eclm.ECLM` beyond the base ones."""
    check_model(model)
    part = cfg.dataset.partition
    return {
        "catalog": catalog(model, cfg.algorithm.batch_size),
        "layer_sizes": model.layer_sizes(),
        "samples_per_device": (part.size_min + part.size_max) // 2,
        "epochs": cfg.algorithm.local_epochs,
        "round_budget_s": cfg.algorithm.eclm.round_budget_s,
        "size_cap": cfg.algorithm.eclm.size_cap,
    }


def client_options(cfg: RunConfig) -> dict[str, Any]:
    """What an ECLM device reads from ``Device.options``."""
    options = cfg.algorithm.eclm
    return {
        "load_balance_weight": options.load_balance_weight,
        "round_budget_s": options.round_budget_s,
        "local_adjust": options.local_adjust,
    }
