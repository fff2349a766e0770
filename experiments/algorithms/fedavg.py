"""FedAvg (McMahan et al. 2017): every cohort device fine-tunes the cloud model, the cloud averages by data size."""

from __future__ import annotations

from clients.local import LocalTrainingClient
from experiments.algorithms.plugin import Algorithm
from strategies.fedavg import FedAvg

ALGORITHMS = (
    # its baseline: doing nothing, the pre-trained model (NA, ECLM 7.1's lower bound)
    Algorithm("fedavg", "FedAvg (McMahan et al. 2017)", FedAvg, LocalTrainingClient, baseline="algorithm=none"),
)
