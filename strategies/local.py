"""LA, local adaptation only (ECLM 7.1): devices fine-tune the cloud model; nothing is aggregated."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.base import EdgeCloudStrategy
from strategies.metrics import metric_record
from strategies.protocol import ARRAYS_RECORD, CONFIG_RECORD


class LocalAdaptation(EdgeCloudStrategy):
    """Each cohort device fine-tunes the pre-trained cloud model on its own data.

    The device downloads the cloud model (counted) and replies with metrics only; the
    cloud model never changes. ``accuracy`` is the fine-tuned models' local accuracy.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every cohort device gets the (unchanged) cloud model."""
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.TRAIN, lambda pid: content)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """No aggregation: keep the cloud model, average the devices' metrics."""
        return None, metric_record(self.mean_metrics(list(replies)))
