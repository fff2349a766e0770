"""ElasticDNN's cloud: ship the pre-trained master and bank once, tally accuracy per domain (seed 003).

ElasticDNN is on-device remodeling (III): the cloud's part is the offline master DNN
constructor (pre-training on the source domain, done by the apps before the run) and the
delivery of the master and its domain-knowledge bank (and, for the same-size baselines, of
the compressed model the cloud pruned from the master and fine-tuned). Afterwards each device adapts to its
own evolving domains and reports accuracy after adaptation on each domain's held-out batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from strategies.aggregate import weighted_average
from strategies.metrics import metric_record
from strategies.protocol import METRICS_RECORD, WEIGHT_KEY
from strategies.tta import OnlineTTA

#: Array record of the compressed same-size model, sent on a device's first round.
COMPRESSED_KEY = "compressed"
#: Array record of a bank's ``theta*`` by layer: the fleet's average down, each device's own up.
BANK_KEY = "bank"
#: Config entry asking the device to send its bank back.
SHARE_BANK_KEY = "share_bank"


class ElasticDNN(OnlineTTA):
    """Serve master + bank on a device's first participation; cumulative accuracy per domain.

    Same protocol as :class:`strategies.tta.OnlineTTA` (arrays once per device, counts from
    the replies' ``correct``/``num-examples`` and ``stream.domain``); the counts here are of
    predictions made AFTER the device adapted to the domain, so they are reported as
    ``adapted_accuracy`` and ``adapted_accuracy_by_domain``.

    Parameters
    ----------
    compressed : ArrayRecord, optional
        The same-size baselines' compressed model (the master's largest filters, fine-tuned on
        the source data by the cloud); shipped beside the master on a device's first round.
    bank : ArrayRecord, optional
        The pre-trained bank's ``theta*`` by layer. Given, the cloud averages the banks of the
        round's devices (FedAvg over banks, weighted by adaptation samples: an extension beyond
        the paper, ``algorithm.elasticdnn.bank_fedavg``): every TRAIN message carries the current
        average under ``bank`` (the device adopts it) and asks for the device's own back
        (``share_bank``).
    **base
        The arguments of :class:`strategies.base.EdgeCloudStrategy`.
    """

    def __init__(self, compressed: ArrayRecord | None = None, bank: ArrayRecord | None = None, **base: Any) -> None:
        super().__init__(**base)
        self.compressed = compressed
        self.bank = bank

    def train_config(self, server_round: int) -> ConfigRecord:
        """The round, and ``share_bank`` when banks are averaged."""
        if self.bank is None:
            return super().train_config(server_round)
        return self.round_config(server_round, **{SHARE_BANK_KEY: True})

    def arrays_for(self, pid: int, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """The first participation's records, plus the fleet's bank every round when banks are averaged."""
        records = super().arrays_for(pid, arrays)
        if self.bank is not None:
            records[BANK_KEY] = self.bank
        return records

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The base tallies; with banks averaged, the new fleet bank from the replies' banks (eq. 3's ``theta*``)."""
        replies = list(replies)
        metrics = self.round_metrics(replies)
        if self.bank is not None:
            shared = [r for r in replies if BANK_KEY in r.content.array_records]
            if shared:
                weights = [float(r.content[METRICS_RECORD][WEIGHT_KEY]) for r in shared]
                self.bank = weighted_average([r.content.array_records[BANK_KEY] for r in shared], weights)
            metrics["banks_averaged"] = len(shared)
        return None, metric_record(metrics)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the fleet's bank (``None`` unless banks are averaged)."""
        state = super().state_dict()
        state["bank"] = None if self.bank is None else {k: v.numpy() for k, v in self.bank.items()}
        return state

    def load_state_dict(self, state) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        if state["bank"] is not None:
            self.bank = ArrayRecord({k: Array(np.asarray(v)) for k, v in state["bank"].items()})

    def first_arrays(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """Master and bank as ``arrays``, plus the compressed model when the cloud has one."""
        first = super().first_arrays(arrays)
        if self.compressed is not None:
            first[COMPRESSED_KEY] = self.compressed
        return first

    def online_metrics(self) -> dict[str, Any]:
        """``adapted_accuracy`` (all domains) and ``adapted_accuracy_by_domain``, cumulative over the run."""
        online = super().online_metrics()
        return {
            "adapted_accuracy": online["online_accuracy"],
            "adapted_accuracy_by_domain": online["online_accuracy_by_domain"],
        }
