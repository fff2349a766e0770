"""Online test-time adaptation on the edge, nothing aggregated (CEMA's baselines, seed 000).

The cloud ships the source model once per device; afterwards each device adapts on its own
stream and only reports online accuracy (and, for ``eta_upload``, uploads samples). Protocol:
CEMA's online evaluation (ALGORITHMS.md, "Protocol"): each batch is predicted before the device
adapts to it, accuracy accumulates per corruption over the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.base import EdgeCloudStrategy
from strategies.metrics import metric_record
from strategies.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    CORRECT_KEY,
    DOMAIN_KEY,
    METRICS_RECORD,
    PIXELS_KEY,
    STREAM_RECORD,
    UPLOADS_RECORD,
    WEIGHT_KEY,
)


class OnlineTTA(EdgeCloudStrategy):
    """Serve the source model on a device's first participation; tally online accuracy per domain.

    A device counts as served once it answered with content (its adapter state then lives in
    its ``context.state``); a device that declined or failed before answering gets the arrays
    again next time. The cloud model never changes.

    Attributes
    ----------
    served : set[int]
        Partition ids that already hold the source model.
    online : dict[str, list[int]]
        Cumulative ``[correct, n]`` of the devices' pre-adaptation predictions, per domain.

    Parameters
    ----------
    **base
        The arguments of :class:`strategies.base.EdgeCloudStrategy`.
    """

    def __init__(self, **base: Any) -> None:
        super().__init__(**base)
        self.served: set[int] = set()
        self.online: dict[str, list[int]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One TRAIN message per cohort device: the round config, plus arrays if not yet served."""

        def content(pid: int) -> RecordDict:
            record = RecordDict({CONFIG_RECORD: self.train_config(server_round)})
            for key, value in self.arrays_for(pid, arrays).items():
                record[key] = value
            return record

        return self.messages_for(server_round, MessageType.TRAIN, content)

    def train_config(self, server_round: int) -> ConfigRecord:
        """The ``config`` record of a TRAIN message (the round)."""
        return self.round_config(server_round)

    def arrays_for(self, pid: int, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """The array records of device ``pid``'s TRAIN message: :meth:`first_arrays` until it is served."""
        return {} if pid in self.served else self.first_arrays(arrays)

    def first_arrays(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """The array records a device gets on its first participation: the source model as ``arrays``."""
        return {ARRAYS_RECORD: arrays}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """No aggregation; the round's metrics (:meth:`round_metrics`) as a MetricRecord."""
        return None, metric_record(self.round_metrics(list(replies)))

    def round_metrics(self, replies: list[Message]) -> dict[str, Any]:
        """Mean reply metrics, cumulative online accuracy by domain, this round's uploads by device.

        Marks every device that answered as served (even if dropped as a straggler).
        """
        self.served.update(self.ledger.device_time_s)  # answered, even if dropped as stragglers
        self.served.update(self.partition_of(r) for r in replies)
        samples, nbytes, by_device = 0, 0, {}
        for reply in replies:
            self._tally(reply)
            up_samples, up_bytes = upload_size(reply)
            samples += up_samples
            nbytes += up_bytes
            if up_samples:
                by_device[str(self.partition_of(reply))] = up_samples
        metrics: dict[str, Any] = dict(self.mean_metrics(replies))
        metrics.update(self.online_metrics())
        metrics["uploaded_samples"] = samples
        metrics["uploaded_bytes"] = nbytes
        metrics["uploaded_samples_by_device"] = by_device
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The base state plus ``served`` (sorted partition ids) and the ``online`` tallies."""
        state = super().state_dict()
        state["served"] = sorted(self.served)
        state["online"] = {domain: list(tally) for domain, tally in self.online.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.served = {int(pid) for pid in state["served"]}
        self.online = {str(domain): [int(c), int(n)] for domain, (c, n) in state["online"].items()}

    def _tally(self, reply: Message) -> None:
        metrics = reply.content[METRICS_RECORD]
        domain = str(reply.content[STREAM_RECORD][DOMAIN_KEY])
        tally = self.online.setdefault(domain, [0, 0])
        tally[0] += int(metrics[CORRECT_KEY])
        tally[1] += int(metrics[WEIGHT_KEY])

    def online_metrics(self) -> dict[str, Any]:
        """``online_accuracy`` (all domains) and ``online_accuracy_by_domain``, cumulative over the run."""
        correct = sum(c for c, _ in self.online.values())
        seen = sum(n for _, n in self.online.values())
        return {
            "online_accuracy": correct / seen if seen else None,
            "online_accuracy_by_domain": {d: c / n for d, (c, n) in sorted(self.online.items()) if n},
        }


def upload_size(reply: Message) -> tuple[int, int]:
    """Samples and array bytes (``numpy().nbytes``, no serialisation header) a reply uploads."""
    record = reply.content.array_records.get(UPLOADS_RECORD)
    if record is None:
        return 0, 0
    pixels = record[PIXELS_KEY].numpy()
    return int(len(pixels)), int(sum(arr.numpy().nbytes for arr in record.values()))
