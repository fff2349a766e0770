"""NA, no adaptation (ECLM 7.1): devices use the pre-trained cloud model as it is."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.base import EdgeCloudStrategy
from strategies.protocol import ARRAYS_RECORD, CONFIG_RECORD


class NoAdaptation(EdgeCloudStrategy):
    """The cohort only evaluates the pre-trained cloud model on its local test data."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing trains."""
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Nothing to aggregate."""
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every cohort device gets the pre-trained cloud model to evaluate."""
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.EVALUATE, lambda pid: content)
