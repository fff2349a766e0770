"""The plug-in contract: what an algorithm tells the apps about itself.

An algorithm is four files: its cloud side (``strategies/x.py``, a Flower strategy), its edge
side (``clients/x.py``, a handler), its plug-in (``experiments/algorithms/x.py``, which builds one
:class:`Algorithm` per name it offers and lists them in a module constant ``ALGORITHMS``) and its
defaults (``conf/algorithm/x.yaml``). The registry (:mod:`experiments.algorithms`) finds every
plug-in module of the package by itself; no code outside the plug-in names the algorithm.

The strategy and the client never import each other: they meet only in Flower messages. The
plug-in is where they are paired and handed what they need from the run configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from clients.base import ClientHandler
from experiments.pretrain.cache import CloudTraining
from experiments.schema import RunConfig
from strategies.base import EdgeCloudStrategy

#: The published settings ``scenario=auto`` resolves to (files of ``conf/scenario/``).
CORRUPTED = "corrupted"  # ECLM's one adaptation step, the edge data under a mix of corruptions (the quick start)
ONLINE = "online"  # CEMA and its TTA baselines: per-device online streams of corrupted batches (CEMA poster)
EVOLVING = "evolving"  # ElasticDNN: a new target domain per round, an adaptation and a held-out batch (seed 003, IV)

#: Baselines of the online methods: the un-adapted pre-trained model, and (for it) Tent.
SOURCE_BASELINE = "algorithm=source"
TENT_BASELINE = "algorithm=tent"


def no_arguments(*_args: Any) -> dict[str, Any]:
    """The default of the argument hooks: nothing beyond the base arguments."""
    return {}


def any_model(_model: nn.Module) -> None:
    """The default model check: every network will do."""


def nothing_to_check(_cfg: RunConfig) -> None:
    """The default validation: the common checks are enough."""


@dataclass(frozen=True)
class Algorithm:
    """A named algorithm and what the apps must hand it.

    Attributes
    ----------
    name, description : str
        What ``algorithm=<name>`` selects, and one line for tables and ``--help``.
    strategy : type[EdgeCloudStrategy]
        The cloud side.
    client : type[ClientHandler]
        The edge side.
    options : type or None
        A frozen dataclass of the algorithm's own settings, read from ``algorithm.<options.KEY>``
        of the configuration (its class attribute ``KEY`` names the block; algorithms of one
        family share a block). ``cfg.algorithm.options`` holds the instance. None: no settings.
    default_model : str
        The network ``model.name=auto`` (the default) resolves to.
    default_scenario : str
        The scenario ``scenario=auto`` (the default) resolves to: the setting the algorithm was
        published for (a file of ``conf/scenario/``).
    cloud_training : callable or None
        ``(cfg, model, proxy_x, proxy_y, data) -> None``: the cloud's own training on the proxy
        part; None means plain supervised pre-training.
    training_key : callable
        ``cfg -> dict``: the settings that shape ``cloud_training`` (part of the pre-training
        cache key).
    strategy_args : callable
        ``(cfg, model, data) -> dict``: strategy arguments beyond the base ones.
    client_options : callable
        ``cfg -> dict``: what devices read from ``Device.options``.
    check_model : callable
        ``model -> None``; raises ConfigError if the algorithm cannot use the network.
    validate : callable
        ``cfg -> None``; raises ConfigError naming the key and the fix for settings the
        algorithm cannot run with (its options, or a scenario it cannot use).
    device_state : bool
        Whether its devices keep state between rounds in ``context.state`` (online stream
        position, adapter, filter): a resumed run then needs the state the devices saved.
    baseline : str
        The overrides of the run to compare against on the same devices, suggested when a run
        ends (``algorithm=fedavg``; the online methods' is the un-adapted ``source``).
    caveat : str
        One line on where the algorithm's adaptation, with its defaults on its default scenario,
        is known not to help (the zoo prints it beside a row whose accuracy fell); "" if none.
    local_test : bool
        Whether the round's ``accuracy`` is the devices' score on their local test sets; the
        round then also records the pre-trained model's score on those sets
        (``pretrained_accuracy``). False for methods scored on stream batches (online accuracy).
    """

    name: str
    description: str
    strategy: type[EdgeCloudStrategy]
    client: type[ClientHandler]
    options: type | None = None
    default_model: str = "cnn"
    default_scenario: str = CORRUPTED
    cloud_training: Callable[..., None] | None = None
    training_key: Callable[[RunConfig], dict] = no_arguments
    strategy_args: Callable[..., dict] = no_arguments
    client_options: Callable[[RunConfig], dict] = no_arguments
    check_model: Callable[[nn.Module], None] = any_model
    validate: Callable[[RunConfig], None] = nothing_to_check
    device_state: bool = False
    local_test: bool = True
    baseline: str = "algorithm=fedavg"
    caveat: str = ""

    @property
    def options_key(self) -> str | None:
        """The configuration block of this algorithm's settings (``algorithm.<key>``), if any."""
        return None if self.options is None else self.options.KEY

    def pretraining(self, cfg: RunConfig) -> CloudTraining | None:
        """The algorithm's own cloud training for ``cfg``, or None for plain pre-training."""
        if self.cloud_training is None:
            return None
        return CloudTraining(self.name, self.cloud_training, self.training_key(cfg))
