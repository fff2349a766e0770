"""CEMA (seed 000): entropy-selected uploads; the cloud adapts a foundation model and distils the edge model.

The plug-in hands CEMA's strategy its pre-trained foundation model (or the checkpoint of one),
the edge model's factory and preprocessing, and the devices their upload filter's settings
(``algorithm.cema.*``, defaults from the official code chenyaofo/CEMA and its results).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from clients.cema import EDGE_BN_CHOICES, CEMAClient
from experiments.algorithms.plugin import ONLINE, SOURCE_BASELINE, Algorithm
from experiments.data import to_tensor
from experiments.data.reference_family import CIFAR, IMAGENET, reference_family
from experiments.data.settings import IMAGENET_C
from experiments.pretrain.cache import pretrained_model
from experiments.pretrain.networks import build_run_model
from experiments.schema import ConfigError, RunConfig
from experiments.validation import require
from models.catalog import model_names
from strategies.cema import CEMA, EDGE_MODES, SEND_MODES

#: CEMA's redundancy margin d on |cos| per reference configuration family, when
#: ``algorithm.cema.d_margin`` is null. ImageNet-C: 0.05 (chenyaofo/CEMA ``conf/cema.conf``
#: ``d_margin: 0.05``; mr-eggplant/EATA ``main.py --d_margin`` default 0.05). CIFAR-10-C: 0.4
#: (EATA and ETA configs of mariodoebler/test-time-adaptation ``classification/cfgs/cifar10_c/eata.yaml``
#: and ``eta.yaml``, ``D_MARGIN: 0.4``; the official EATA repository ships ImageNet settings only).
D_MARGIN_BY_FAMILY = {CIFAR: 0.4, IMAGENET: 0.05}
#: Datasets whose reference configuration departs from their family's: CIFAR-100-C 0.1
#: (mariodoebler/test-time-adaptation ``classification/cfgs/cifar100_c/eata.yaml`` and ``eta.yaml``).
D_MARGIN_BY_DATASET = {"cifar100": 0.1}


@dataclass(frozen=True)
class CemaOptions:
    """CEMA's own settings, ``algorithm.cema.*`` (seed 000; ALGORITHMS.md, official code chenyaofo/CEMA)."""

    KEY: ClassVar[str] = "cema"

    foundation_model: str = "resnet18"  # the cloud's bigger network, pre-trained on the proxy part
    foundation_width: int = 16  # its width (narrow CPU variant; the poster uses ResNet-50/101)
    foundation_checkpoint: str | None = None  # its state dict file instead of pre-training (required for imagenet_c)
    send: str = "bn"  # bn: BN affine + running statistics back to devices (official code) | full
    replay_capacity: int = 10_000  # FIFO replay buffer (official conf/cema.conf replay_buffer_size)
    e_max: float = 0.4  # E_max^0 = e_max * ln C, also the cloud's loss reference (official conf ent_high_margin)
    e_min: float | None = 0.02  # E_min = e_min * ln C, the setting behind the poster's upload figures (official tools/results.txt); None: no lower bound (conf/cema.conf)
    threshold_coeff: float = 1.0  # lambda of the dynamic E_max rule (official tools/results.txt; conf/cema.conf 0.6, unused without warm-up)
    warmup_samples: int | None = 640  # samples before the dynamic rule starts (assumption: 10 batches of 64, none published); None: never (conf/cema.conf)
    d_margin: float | None = None  # redundancy margin on |cos|; None: 0.4 CIFAR-10 family, 0.1 CIFAR-100, 0.05 ImageNet (experiments/algorithms/cema.py)
    tbr: bool = True  # BN: Test-time Batch Renormalization (official conf is_tbr: true) | false: batch statistics
    edge_models: str = "shared"  # shared: one edge model for the fleet | per_device: one per device
    edge_bn: str | None = None  # edge prediction's BN: None = as tbr (official infer) | batch | running (plain eval mode)


def validate(cfg: RunConfig) -> None:
    """CEMA's options, with the rules its code applies (models/cema/filter.py, strategies/cema.py,
    clients/cema.py), so a run validation accepts never fails on a device; on ImageNet-C the
    foundation network's checkpoint is required (there is no proxy part to pre-train it on)."""
    cema: CemaOptions = cfg.algorithm.options
    require(cema.foundation_model in model_names(), "algorithm.cema.foundation_model",
            f"must be one of {list(model_names())}", cema.foundation_model)
    require(cema.foundation_width >= 1, "algorithm.cema.foundation_width", "must be >= 1", cema.foundation_width)
    require(cema.send in SEND_MODES, "algorithm.cema.send", f"must be one of {SEND_MODES}", cema.send)
    require(cema.replay_capacity >= 1, "algorithm.cema.replay_capacity", "must be >= 1", cema.replay_capacity)
    require(0 < cema.e_max <= 1, "algorithm.cema.e_max", "must be in (0, 1]", cema.e_max)
    if cema.e_min is not None:
        require(0 <= cema.e_min < cema.e_max, "algorithm.cema.e_min",
                f"must satisfy 0 <= e_min < e_max={cema.e_max}, or be null (no lower bound)", cema.e_min)
    require(cema.threshold_coeff > 0, "algorithm.cema.threshold_coeff", "must be > 0", cema.threshold_coeff)
    if cema.warmup_samples is not None:
        require(cema.warmup_samples >= 1, "algorithm.cema.warmup_samples", "must be >= 1, or null (no warm-up)",
                cema.warmup_samples)
    if cema.d_margin is not None:
        require(cema.d_margin > 0, "algorithm.cema.d_margin", "must be > 0, or null (the dataset's reference value)",
                cema.d_margin)
    require(cema.edge_models in EDGE_MODES, "algorithm.cema.edge_models", f"must be one of {EDGE_MODES}",
            cema.edge_models)
    require(cema.edge_bn in EDGE_BN_CHOICES, "algorithm.cema.edge_bn",
            "must be null (as algorithm.cema.tbr), 'batch' or 'running'", cema.edge_bn)
    if cfg.dataset.name == IMAGENET_C and cema.foundation_checkpoint is None:
        raise ConfigError(
            "algorithm.cema.foundation_checkpoint is null: ImageNet-C has no proxy part to pre-train on; set it "
            f"to a torchvision state dict file of {cema.foundation_model} (CEMA's foundation network)"
        )


def foundation_config(cfg: RunConfig) -> RunConfig:
    """The run config of the cloud's foundation model (its pre-training is cached like any other,
    or skipped when ``algorithm.cema.foundation_checkpoint`` names its weights file)."""
    options = cfg.algorithm.options
    model = dataclasses.replace(
        cfg.model, name=options.foundation_model, width=options.foundation_width, top_k=None,
        modules_per_layer=None, shrink=None, checkpoint=options.foundation_checkpoint,
    )
    return dataclasses.replace(cfg, model=model)


def strategy_args(cfg: RunConfig, model: nn.Module, data) -> dict:
    """CEMA's cloud: a pre-trained foundation model, the edge model's factory, preprocessing."""
    fcfg = foundation_config(cfg)
    foundation = build_run_model(fcfg.model, data.num_classes, data.image_shape[0], seed=fcfg.seed)
    try:
        foundation = pretrained_model(fcfg, foundation, data)
    except ConfigError as error:
        raise ConfigError(f"CEMA's foundation network: {error} (algorithm.cema.foundation_checkpoint)") from None
    return {
        "foundation": foundation,
        "edge_factory": functools.partial(build_run_model, cfg.model, data.num_classes, data.image_shape[0]),
        "preprocess": to_tensor,
        "num_classes": data.num_classes,
        "e_max_fraction": cfg.algorithm.options.e_max,
        "bn": "tbr" if cfg.algorithm.options.tbr else "batch",
        "send": cfg.algorithm.options.send,
        "replay_capacity": cfg.algorithm.options.replay_capacity,
        "edge_models": cfg.algorithm.options.edge_models,
    }


def d_margin(cfg: RunConfig) -> float:
    """``algorithm.cema.d_margin``, or the reference value for the dataset (:data:`D_MARGIN_BY_DATASET`,
    else its family's, :data:`D_MARGIN_BY_FAMILY`)."""
    margin = cfg.algorithm.options.d_margin
    if margin is not None:
        return margin
    name = cfg.dataset.name
    return D_MARGIN_BY_DATASET.get(name, D_MARGIN_BY_FAMILY[reference_family(name)])


def client_options(cfg: RunConfig) -> dict:
    """The upload filter's settings and the BatchNorm mode of the edge's prediction on every device."""
    options = cfg.algorithm.options
    return {
        "e_max_fraction": options.e_max,
        "e_min_fraction": options.e_min,
        "threshold_coeff": options.threshold_coeff,
        "warmup_samples": options.warmup_samples,
        "cosine_margin": d_margin(cfg),
        "tbr": options.tbr,
        "edge_bn": options.edge_bn,
    }


ALGORITHMS = (
    Algorithm(
        "cema",
        "CEMA: entropy-selected uploads, foundation adaptation and selective distillation in the cloud",
        CEMA,
        CEMAClient,
        options=CemaOptions,
        strategy_args=strategy_args,
        client_options=client_options,
        validate=validate,
        device_state=True,
        local_test=False,
        default_scenario=ONLINE,
        baseline=SOURCE_BASELINE,
    ),
)
