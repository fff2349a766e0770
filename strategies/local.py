"""LA, local adaptation only (ECLM 7.1): devices fine-tune the cloud model; nothing is aggregated."""

from __future__ import annotations

from flwr.app import MessageType, RecordDict

from strategies.base import EdgeCloudStrategy


class LocalAdaptation(EdgeCloudStrategy):
    """Each cohort device fine-tunes the pre-trained cloud model on its own data.

    The device downloads the cloud model (counted) and replies with metrics only; the
    cloud model never changes. ``accuracy`` is the fine-tuned models' local accuracy.
    """

    def configure_train(self, server_round, arrays, config, grid):
        """Every cohort device gets the (unchanged) cloud model."""
        content = RecordDict({"arrays": arrays, "config": self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.TRAIN, lambda pid: content)

    def aggregate_train(self, server_round, replies):
        """No aggregation: keep the cloud model, average the devices' metrics."""
        return None, self.mean_metrics(list(replies)) or None
