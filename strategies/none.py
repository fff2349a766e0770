"""NA, no adaptation (ECLM 7.1): devices use the pre-trained cloud model as it is."""

from __future__ import annotations

from flwr.app import MessageType, RecordDict

from strategies.base import EdgeCloudStrategy


class NoAdaptation(EdgeCloudStrategy):
    """The cohort only evaluates the pre-trained cloud model on its local test data."""

    def configure_train(self, server_round, arrays, config, grid):
        """Nothing trains."""
        return []

    def aggregate_train(self, server_round, replies):
        """Nothing to aggregate."""
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        """Every cohort device gets the pre-trained cloud model to evaluate."""
        content = RecordDict({"arrays": arrays, "config": self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.EVALUATE, lambda pid: content)
