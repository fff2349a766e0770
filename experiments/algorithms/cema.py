"""What the apps hand CEMA and the online TTA baselines: the foundation model, preprocessing, device options."""

from __future__ import annotations

import dataclasses
import functools

from torch import nn

from clients.tta import adapter_for
from experiments.config import RunConfig
from experiments.data import to_tensor
from experiments.pretrain.networks import build_run_model
from experiments.data.reference_family import CIFAR, IMAGENET, reference_family
from models.tta.settings import resolve as resolve_tta_settings

#: CEMA's redundancy margin d on |cos| per reference configuration family, when
#: ``algorithm.cema.d_margin`` is null. ImageNet-C: 0.05 (chenyaofo/CEMA ``conf/cema.conf``
#: ``d_margin: 0.05``; mr-eggplant/EATA ``main.py --d_margin`` default 0.05). CIFAR-10-C: 0.4
#: (EATA and ETA configs of mariodoebler/test-time-adaptation ``classification/cfgs/cifar10_c/eata.yaml``
#: and ``eta.yaml``, ``D_MARGIN: 0.4``; the official EATA repository ships ImageNet settings only).
D_MARGIN_BY_FAMILY = {CIFAR: 0.4, IMAGENET: 0.05}
#: Datasets whose reference configuration departs from their family's: CIFAR-100-C 0.1
#: (mariodoebler/test-time-adaptation ``classification/cfgs/cifar100_c/eata.yaml`` and ``eta.yaml``).
D_MARGIN_BY_DATASET = {"cifar100": 0.1}


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
    from experiments.pretrain.cache import pretrained_model  # the registry imports this module

    fcfg = foundation_config(cfg)
    foundation = build_run_model(fcfg.model, data.num_classes, data.image_shape[0])
    foundation = pretrained_model(fcfg, foundation, data)
    return {
        "foundation": foundation,
        "edge_factory": functools.partial(build_run_model, cfg.model, data.num_classes, data.image_shape[0]),
        "preprocess": to_tensor,
        "num_classes": data.num_classes,
        "e_max_fraction": cfg.algorithm.cema.e_max,
        "bn": "tbr" if cfg.algorithm.cema.tbr else "batch",
        "send": cfg.algorithm.cema.send,
        "replay_capacity": cfg.algorithm.cema.replay_capacity,
        "edge_models": cfg.algorithm.cema.edge_models,
    }


def d_margin(cfg: RunConfig) -> float:
    """``algorithm.cema.d_margin``, or the reference value for the dataset (:data:`D_MARGIN_BY_DATASET`,
    else its family's, :data:`D_MARGIN_BY_FAMILY`)."""
    margin = cfg.algorithm.cema.d_margin
    if margin is not None:
        return margin
    name = cfg.dataset.name
    return D_MARGIN_BY_DATASET.get(name, D_MARGIN_BY_FAMILY[reference_family(name)])


def client_options(cfg: RunConfig) -> dict:
    """The upload filter's settings and the BatchNorm mode of the edge's prediction on every device."""
    options = cfg.algorithm.cema
    return {
        "e_max_fraction": options.e_max,
        "e_min_fraction": options.e_min,
        "threshold_coeff": options.threshold_coeff,
        "warmup_samples": options.warmup_samples,
        "cosine_margin": d_margin(cfg),
        "tbr": options.tbr,
        "edge_bn": options.edge_bn,
    }


def tta_options(method: str):
    """Device options of an on-device TTA baseline: the method and its adapter's hyper-parameters
    (``algorithm.tta.<adapter>``), each null resolved to the official configuration's value for the
    dataset's reference family (models/tta/settings.py)."""
    adapter = adapter_for(method)

    def options(cfg: RunConfig) -> dict:
        section = getattr(cfg.algorithm.tta, adapter, None)
        configured = {} if section is None else dataclasses.asdict(section)
        hyper = resolve_tta_settings(adapter, reference_family(cfg.dataset.name), cfg.dataset.name, configured)
        return {"method": method, "hyper": hyper}

    return options
