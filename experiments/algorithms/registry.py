"""Algorithms registered by name: which strategy (cloud) pairs with which handler (edge).

The pairing lives here, in ``experiments/``, because strategies and clients never import
each other; they meet only in Flower messages. An algorithm may also bring its own cloud
training on the proxy part, extra strategy arguments and device options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from clients.an import AdaptiveNetClient
from clients.base import ClientHandler
from clients.cema import CEMAClient
from clients.eclm import ECLMClient
from clients.elastic import ElasticClient
from clients.heterofl import HeteroFLClient
from clients.local import LocalOnlyClient, LocalTrainingClient
from clients.tta import TTAClient
from experiments.algorithms import an as an_setup, cema as cema_setup, eclm as eclm_setup, elasticdnn as elastic_setup, heterofl as heterofl_setup
from strategies.an import AdaptiveNet
from strategies.base import EdgeCloudStrategy
from strategies.cema import CEMA
from strategies.eclm import ECLM
from strategies.elastic import ElasticDNN
from strategies.fedavg import FedAvg
from strategies.heterofl import FedRolex, HeteroFL
from strategies.local import LocalAdaptation
from strategies.none import NoAdaptation
from strategies.tta import OnlineTTA


def _no_args(*_args) -> dict[str, Any]:
    return {}


def _any_model(_model: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class Algorithm:
    """A named algorithm and what the apps must hand it.

    Attributes
    ----------
    name, description : str
    strategy : type[EdgeCloudStrategy]
        The cloud side.
    client : type[ClientHandler]
        The edge side.
    cloud_training : callable or None
        ``(cfg, model, proxy_x, proxy_y, data) -> None``: the cloud's own training on the
        proxy part; None means plain supervised pre-training.
    training_key : callable
        ``cfg -> dict``: the options that shape ``cloud_training`` (pre-training cache key).
    strategy_args : callable
        ``(cfg, model, data) -> dict``: strategy arguments beyond the base ones.
    client_options : callable
        ``cfg -> dict``: what devices read from ``Device.options``.
    check_model : callable
        ``model -> None``; raises ConfigError if the algorithm cannot use the network.
    default_model : str
        The network ``model.name=auto`` (the default) resolves to.
    device_state : bool
        Whether its devices keep state between rounds in ``context.state`` (online stream
        position, adapter, filter): a resumed run then needs the state the devices saved
        (``experiments/resume/device_state.py``).
    """

    name: str
    strategy: type[EdgeCloudStrategy]
    client: type[ClientHandler]
    description: str
    cloud_training: Callable[..., None] | None = None
    training_key: Callable[..., dict] = _no_args
    strategy_args: Callable[..., dict] = _no_args
    client_options: Callable[..., dict] = _no_args
    check_model: Callable[[nn.Module], None] = _any_model
    default_model: str = "cnn"
    device_state: bool = False


def _width_scaled(name: str, strategy: type[EdgeCloudStrategy], description: str) -> Algorithm:
    """HeteroFL and FedRolex share their client, cloud training and options (algorithm.heterofl)."""
    return Algorithm(
        name,
        strategy,
        HeteroFLClient,
        description,
        cloud_training=heterofl_setup.cloud_training,
        training_key=heterofl_setup.training_key,
        strategy_args=heterofl_setup.strategy_args,
        check_model=heterofl_setup.check_model,
    )


def _on_device(name: str, description: str) -> Algorithm:
    """A CEMA baseline: an online test-time adaptation method run on each device (models/tta*.py)."""
    return Algorithm(
        name, OnlineTTA, TTAClient, description, client_options=cema_setup.tta_options(name), device_state=True
    )


#: CEMA's on-device baselines (seed 000; ALGORITHMS.md).
ON_DEVICE_TTA = (
    _on_device("source", "Source: the pre-trained model, no adaptation"),
    _on_device("bn_adapt", "BN adaptation: normalise with the test batch's statistics (Schneider et al. 2020)"),
    _on_device("onda", "ONDA: BN running statistics updated online (Mancini et al. 2018)"),
    _on_device("lame", "LAME: Laplacian-adjusted outputs, no parameter update (Boudiaf et al. 2022)"),
    _on_device("pl", "PL: pseudo-label training of BN affine parameters"),
    _on_device("tent", "Tent: entropy minimisation of BN affine parameters (Wang et al. 2021)"),
    _on_device("cotta", "CoTTA: mean teacher, augmentation-averaged pseudo labels, stochastic restore (Wang et al. 2022)"),
    _on_device("eta", "ETA: EATA's sample-filtered entropy minimisation without Fisher regularisation"),
    _on_device("eta_upload", "ETA whose kept samples are uploaded: the 'SOTA uploading' CEMA compares against"),
)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("fedavg", FedAvg, LocalTrainingClient, "FedAvg (McMahan et al. 2017)"),
        Algorithm("local", LocalAdaptation, LocalOnlyClient, "LA: local fine-tuning only (ECLM 7.1)"),
        Algorithm("none", NoAdaptation, ClientHandler, "NA: the pre-trained cloud model (ECLM 7.1)"),
        _width_scaled(
            "heterofl", HeteroFL, "HeteroFL (Diao et al. 2021): width-scaled prefix sub-models sized to each device's budget"
        ),
        _width_scaled(
            "fedrolex", FedRolex, "FedRolex (Alam et al. 2022): HeteroFL with a channel window rolling one index per round"
        ),
        Algorithm(
            "an",
            AdaptiveNet,
            AdaptiveNetClient,
            "AN: AdaptiveNet-style supernet, on-device branch choice, no aggregation (ECLM 7.1)",
            cloud_training=an_setup.cloud_training,
            strategy_args=an_setup.strategy_args,
            check_model=an_setup.check_model,
            default_model="multibranch_cnn",
        ),
        Algorithm(
            "eclm",
            ECLM,
            ECLMClient,
            "ECLM: modular cloud model, personalized sub-models, module-wise aggregation",
            cloud_training=eclm_setup.cloud_training,
            training_key=eclm_setup.training_key,
            strategy_args=eclm_setup.strategy_args,
            client_options=eclm_setup.client_options,
            check_model=eclm_setup.check_model,
            default_model="modular_resnet18",
        ),
        Algorithm(
            "cema",
            CEMA,
            CEMAClient,
            "CEMA: entropy-selected uploads, foundation adaptation and selective distillation in the cloud",
            strategy_args=cema_setup.strategy_args,
            client_options=cema_setup.client_options,
            device_state=True,
        ),
        *ON_DEVICE_TTA,
        Algorithm(
            "elasticdnn",
            ElasticDNN,
            ElasticClient,
            "ElasticDNN: on-device master/surrogate remodeling on evolving domains (or a same-size baseline)",
            cloud_training=elastic_setup.cloud_training,
            training_key=elastic_setup.training_key,
            strategy_args=elastic_setup.strategy_args,
            client_options=elastic_setup.client_options,
            check_model=elastic_setup.check_model,
            default_model="elastic_fbs_resnet_cpu",
            device_state=True,
        ),
    )
}
