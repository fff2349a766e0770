"""Algorithms registered by name: which strategy (cloud) pairs with which handler (edge).

The pairing lives here, in ``experiments/``, because strategies and clients never import
each other; they meet only in Flower messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.base import ClientHandler
from clients.local import LocalOnlyClient, LocalTrainingClient
from strategies.base import EdgeCloudStrategy
from strategies.fedavg import FedAvg
from strategies.local import LocalAdaptation
from strategies.none import NoAdaptation


@dataclass(frozen=True)
class Algorithm:
    """A named algorithm: its cloud strategy, its edge handler and a one-line description."""

    name: str
    strategy: type[EdgeCloudStrategy]
    client: type[ClientHandler]
    description: str


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("fedavg", FedAvg, LocalTrainingClient, "FedAvg (McMahan et al. 2017)"),
        Algorithm("local", LocalAdaptation, LocalOnlyClient, "LA: local fine-tuning only (ECLM 7.1)"),
        Algorithm("none", NoAdaptation, ClientHandler, "NA: the pre-trained cloud model (ECLM 7.1)"),
    )
}
