"""HeteroFL (Diao et al. 2021) and FedRolex (Alam et al. 2022): width-scaled sub-models sized to each device.

Both share the client, the cloud's training at every width, the model check and their options
(``algorithm.heterofl.*``); FedRolex's strategy rolls the kept channel window each round.
The cloud measures the global static BN statistics of every aggregated model on its proxy part
(:func:`cloud_statistics`), as HeteroFL's ``stats()`` does on the server's training set and as
:func:`cloud_training` did for the pre-trained model, so an unchanged model keeps its statistics
and scores what the pre-trained model scores. A dataset without a proxy part (ImageNet-C) leaves
the statistics to the devices (HeteroFL sec. 3.2's query, :class:`strategies.heterofl.HeteroFL`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from clients.heterofl import HeteroFLClient
from experiments.algorithms.plugin import Algorithm
from experiments.data import to_tensor
from experiments.pretrain.networks import build_run_model
from experiments.results.phase_progress import phase
from experiments.schema import ConfigError, RunConfig
from experiments.validation import require
from models.batchnorm import reestimate_bn
from models.training import TrainSettings, train_epochs
from models.width.layers import check_width_scalable, scaled_model, static_bn_statistics
from models.width.submodel import WIDTH_RATES, SubModelUpdate, covering_average, extract
from strategies.heterofl import CloudStatistics, FedRolex, HeteroFL


@dataclass(frozen=True)
class HeteroflOptions:
    """HeteroFL / FedRolex settings, ``algorithm.heterofl.*`` (Diao et al. 2021; Alam et al. 2022)."""

    KEY: ClassVar[str] = "heterofl"

    rates: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)  # HeteroFL sec. 4, levels a-e
    round_budget_s: float | None = None  # None: fleet.deadline_s, else the fleet's median full-model round time
    budget_quantile: float = 0.5  # which device's round time sets the default budget (assumption)
    weight_by_examples: bool = False  # both reference codes average covering clients by count
    global_sbn: bool = True  # devices score the aggregated full model with the cloud's sBN (HeteroFL test), as FedAvg
    multirate_epochs: int = 2  # cloud passes over every width so the pre-trained model can be cut (assumption)
    label_split: bool = True  # classifier rows averaged over the devices holding the class (HeteroFL/FedRolex combine)
    label_mask: bool = True  # mask absent classes' logits in local training and test (official `mask: '1'`)
    clip_grad_norm: float | None = 1.0  # local gradient-norm clip (HeteroFL Local.train, FedRolex client step)


def validate(cfg: RunConfig) -> None:
    """The options' ranges: rates among HeteroFL's levels, a positive budget and clip."""
    hfl: HeteroflOptions = cfg.algorithm.options
    require(bool(hfl.rates) and all(r in WIDTH_RATES for r in hfl.rates), "algorithm.heterofl.rates",
            f"must be a non-empty subset of {WIDTH_RATES}", hfl.rates)
    if hfl.round_budget_s is not None:
        require(hfl.round_budget_s > 0, "algorithm.heterofl.round_budget_s", "must be > 0 or null", hfl.round_budget_s)
    require(0 < hfl.budget_quantile <= 1, "algorithm.heterofl.budget_quantile", "must be in (0, 1]",
            hfl.budget_quantile)
    require(hfl.multirate_epochs >= 0, "algorithm.heterofl.multirate_epochs", "must be >= 0", hfl.multirate_epochs)
    if hfl.clip_grad_norm is not None:
        require(0 < hfl.clip_grad_norm < math.inf, "algorithm.heterofl.clip_grad_norm",
                "must be a finite number > 0 or null", hfl.clip_grad_norm)


def check_model(model: nn.Module) -> None:
    """HeteroFL cuts every conv/linear to a channel prefix; refuse networks it cannot cut."""
    try:
        check_width_scalable(model)
    except ValueError as exc:
        raise ConfigError(f"heterofl/fedrolex cannot width-scale this model ({exc}); use model=cnn or resnet18") from exc


def training_key(cfg: RunConfig) -> dict:
    """What shapes the cloud training (for the pre-training cache key)."""
    return {"rates": list(cfg.algorithm.options.rates), "multirate_epochs": cfg.algorithm.options.multirate_epochs}


def strategy_args(cfg: RunConfig, model: nn.Module, data) -> dict:
    """Constructor arguments of :class:`strategies.heterofl.HeteroFL` from ``algorithm.heterofl``.

    They include ``cloud_statistics`` (:func:`cloud_statistics`) when the dataset has a proxy part.
    """
    options = dataclasses.asdict(cfg.algorithm.options)
    options.pop("multirate_epochs")
    if options["round_budget_s"] is None and cfg.fleet.deadline_s is not None:
        options["round_budget_s"] = cfg.fleet.deadline_s
    statistics = cloud_statistics(cfg, data)
    if statistics is not None:
        options["cloud_statistics"] = statistics
    return options


def cloud_statistics(cfg: RunConfig, data) -> CloudStatistics | None:
    """The cloud's global static BN: a full model's BN statistics measured on the proxy part.

    The same measurement as the last step of :func:`cloud_training` (the proxy images, batches
    of ``pretrain.batch_size``, :func:`models.batchnorm.reestimate_bn` with even batches), so
    the pre-trained model's own statistics come back unchanged. None when the dataset has no
    proxy part (the strategy then pools the devices' statistics).
    """
    proxy_x, _ = data.proxy()
    if len(proxy_x) == 0:
        return None
    factory = functools.partial(build_run_model, cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
    return functools.partial(static_bn_statistics, factory, x=to_tensor(proxy_x), batch_size=cfg.pretrain.batch_size)


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
    settings = TrainSettings(pre.epochs, pre.lr, pre.batch_size, "adam", schedule=pre.schedule)
    with phase("HeteroFL cloud training at full width", total=pre.epochs, unit="epoch") as progress:
        train_epochs(model, x, y, settings, cfg.seed, on_epoch=progress.epoch)
    factory = lambda: build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)  # noqa: E731
    fine = TrainSettings(1, pre.lr / 3, pre.batch_size, "adam")
    rates = sorted(cfg.algorithm.options.rates)
    epochs = cfg.algorithm.options.multirate_epochs
    with phase("HeteroFL cloud training at every width", total=epochs * len(rates), unit="sub-model epoch") as progress:
        for epoch in range(epochs):
            state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
            updates = []
            for step, rate in enumerate(rates):  # one "client" per rate, averaged like a HeteroFL round
                sub = scaled_model(factory, rate)
                sub.load_state_dict({k: torch.from_numpy(v) for k, v in extract(state, rate).items()})
                loss = train_epochs(sub, x, y, fine, seed=cfg.seed * 1000 + epoch * 10 + step)
                updates.append(SubModelUpdate({k: v.detach().numpy() for k, v in sub.state_dict().items()}, rate))
                progress(loss=loss)
            merged = covering_average(state, updates)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})
    reestimate_bn(model, x, pre.batch_size, even_batches=True)


def _width_scaled(name: str, strategy: type[HeteroFL], description: str) -> Algorithm:
    """HeteroFL and FedRolex differ only in their strategy."""
    return Algorithm(
        name,
        description,
        strategy,
        HeteroFLClient,
        options=HeteroflOptions,
        cloud_training=cloud_training,
        training_key=training_key,
        strategy_args=strategy_args,
        check_model=check_model,
        validate=validate,
    )


ALGORITHMS = (
    _width_scaled("heterofl", HeteroFL,
                  "HeteroFL (Diao et al. 2021): width-scaled prefix sub-models sized to each device's budget"),
    _width_scaled("fedrolex", FedRolex,
                  "FedRolex (Alam et al. 2022): HeteroFL with a channel window rolling one index per round"),
)
