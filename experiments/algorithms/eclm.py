"""ECLM (seed 001): a modular cloud model, personalized sub-models by knapsack, module-wise aggregation.

The plug-in hands ECLM's strategy and client what they need from the run configuration: its
options (``algorithm.eclm.*``), the cloud's training on the proxy part (end-to-end, then
ability-enhancing, 4.3), the module catalogue with its costs (5.1) and the device options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from clients.eclm import ECLMClient
from experiments.algorithms.plugin import Algorithm
from experiments.results.phase_progress import phase
from experiments.schema import ConfigError, RunConfig
from experiments.validation import require
from models.eclm.ability import define_subtasks, fixed_subtasks
from models.eclm.layer import parse_module_id
from models.eclm.modular import ModularNet
from models.eclm.training import AbilitySettings, train_ability, train_end_to_end
from models.training import TrainSettings
from strategies.eclm import ECLM, ModuleCatalog

#: The ability-enhancing fine-tuning runs at the pre-training rate divided by this (assumption:
#: ECLM 4.3 gives no rate; a fine-tuning step is gentler than the end-to-end training).
ABILITY_LR_DIVISOR = 3

#: Ways to define sub-tasks (4.3 step 1).
SUBTASK_RULES = ("cooccurrence", "fixed")


@dataclass(frozen=True)
class EclmOptions:
    """ECLM's own settings, ``algorithm.eclm.*`` (seed 001 sections 4.3, 5.1, 7.5; ALGORITHMS.md)."""

    KEY: ClassVar[str] = "eclm"

    load_balance_weight: float = 1e-2  # w of the load-balancing loss (Shazeer et al. 2017; ALGORITHMS.md)
    ability_epochs: int = 2  # module ability-enhancing fine-tuning epochs (assumption: paper gives none; quick start)
    subtasks: str = "cooccurrence"  # cooccurrence (classes sharing devices, 4.3 step 1) | fixed
    subtask_size: int = 2  # classes per sub-task (label skew m of Table 1)
    kappa1: float | None = None  # module load cap; None = ceil(T * kappa2 / N), balanced (models/eclm/ability.py)
    kappa2: int = 2  # modules per sub-task (assumption: equals top-k)
    kl_weight: float = 1.0  # lambda of CE + lambda * KL(g, g_label) (assumption)
    ability_load_balance: bool = False  # also add the load-balancing term to that loss (not in ECLM 4.3's fine-tuning loss)
    size_cap: float = 0.25  # largest sub-model / cloud model bytes (ECLM 7.5: 20 % sub-models lose little)
    round_budget_s: float = 60.0  # time a round may take on a device, compute and communication
    local_adjust: bool = True  # devices drop modules under co-running load (ECLM 3, 5.1)


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


def validate(cfg: RunConfig) -> None:
    """ECLM's options: ranges and choices (:class:`EclmOptions`)."""
    eclm: EclmOptions = cfg.algorithm.options
    require(eclm.load_balance_weight >= 0, "algorithm.eclm.load_balance_weight", "must be >= 0",
            eclm.load_balance_weight)
    require(eclm.ability_epochs >= 0, "algorithm.eclm.ability_epochs", "must be >= 0", eclm.ability_epochs)
    require(eclm.subtasks in SUBTASK_RULES, "algorithm.eclm.subtasks", f"must be one of {SUBTASK_RULES}",
            eclm.subtasks)
    require(eclm.subtask_size >= 1, "algorithm.eclm.subtask_size", "must be >= 1", eclm.subtask_size)
    if eclm.kappa1 is not None:
        require(eclm.kappa1 > 0, "algorithm.eclm.kappa1", "must be > 0 or null", eclm.kappa1)
    require(eclm.kappa2 >= 1, "algorithm.eclm.kappa2", "must be >= 1", eclm.kappa2)
    require(eclm.kl_weight >= 0, "algorithm.eclm.kl_weight", "must be >= 0", eclm.kl_weight)
    require(0 < eclm.size_cap <= 1, "algorithm.eclm.size_cap", "must be in (0, 1]", eclm.size_cap)
    require(eclm.round_budget_s > 0, "algorithm.eclm.round_budget_s", "must be > 0", eclm.round_budget_s)


def training_key(cfg: RunConfig) -> dict[str, Any]:
    """What of the config shapes ECLM's cloud training (for the pre-training cache key)."""
    options = dataclasses.asdict(cfg.algorithm.options)
    key = {name: options[name] for name in TRAINING_OPTIONS}
    if cfg.algorithm.options.subtasks == "cooccurrence":
        key["partition"] = dataclasses.asdict(cfg.dataset.partition)
        key["devices"] = cfg.fleet.devices
    return key


def subtasks_for(cfg: RunConfig, data, num_classes: int) -> list[tuple[int, ...]]:
    """ECLM 4.3 step 1: sub-tasks = classes that co-occur on devices, or fixed groups.

    Co-occurrence stands in for the federated data analysis the paper points to
    (footnote 4): the simulator reads each device's class set from its partition.
    """
    options = cfg.algorithm.options
    if options.subtasks == "fixed":
        return fixed_subtasks(num_classes, options.subtask_size)
    class_sets = []
    for pid in range(cfg.fleet.devices):
        plan, _ = data.device_plan(pid, 0)
        class_sets.append(sorted(set(np.asarray(data.pool_labels[plan.rows]).tolist())))
    return define_subtasks(class_sets, num_classes, options.subtask_size)


def cloud_training(cfg: RunConfig, model: ModularNet, x: torch.Tensor, y: torch.Tensor, data) -> None:
    """ECLM 4.3 on the proxy part: end-to-end (CE + load balance), then ability-enhancing.

    Each stage shows its epochs as a progress phase (:mod:`experiments.results.phase_progress`).
    """
    check_model(model)
    options = cfg.algorithm.options
    model.balance_weight = options.load_balance_weight
    pre = cfg.pretrain
    settings = TrainSettings(pre.epochs, pre.lr, pre.batch_size, "adam", schedule=pre.schedule)
    with phase("ECLM cloud training, end to end", total=pre.epochs, unit="epoch") as step:
        train_end_to_end(model, x, y, settings, cfg.seed, on_epoch=step.epoch)
    if options.ability_epochs > 0:
        subtasks = subtasks_for(cfg, data, data.num_classes)
        ability = AbilitySettings(
            options.ability_epochs, options.kappa1, options.kappa2, options.kl_weight, options.ability_load_balance
        )
        fine = TrainSettings(options.ability_epochs, pre.lr / ABILITY_LR_DIVISOR, pre.batch_size, "adam")
        with phase("ECLM module ability-enhancing", total=options.ability_epochs, unit="epoch") as step:
            train_ability(model, x, y, subtasks, data.num_classes, fine, ability, cfg.seed, on_epoch=step.epoch)


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
        "round_budget_s": cfg.algorithm.options.round_budget_s,
        "size_cap": cfg.algorithm.options.size_cap,
    }


def client_options(cfg: RunConfig) -> dict[str, Any]:
    """What an ECLM device reads from ``Device.options``."""
    options = cfg.algorithm.options
    return {
        "load_balance_weight": options.load_balance_weight,
        "round_budget_s": options.round_budget_s,
        "local_adjust": options.local_adjust,
    }


ALGORITHMS = (
    Algorithm(
        "eclm",
        "ECLM: modular cloud model, personalized sub-models, module-wise aggregation",
        ECLM,
        ECLMClient,
        options=EclmOptions,
        default_model="modular_resnet18",
        cloud_training=cloud_training,
        training_key=training_key,
        strategy_args=strategy_args,
        client_options=client_options,
        check_model=check_model,
        validate=validate,
    ),
)
