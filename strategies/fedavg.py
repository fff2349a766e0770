"""FedAvg (McMahan et al., 2017) on the edge-cloud base."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.aggregate import has_non_finite, same_layout, update_divergence, weighted_average
from strategies.base import EdgeCloudStrategy
from strategies.metrics import metric_record
from strategies.protocol import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, WEIGHT_KEY


class FedAvg(EdgeCloudStrategy):
    """Each cohort device trains the cloud model; the cloud averages by data size.

    After aggregation the same cohort evaluates the new cloud model on its held-out
    local data: that is the round's ``accuracy``. The replies are the ones Flower's own
    ``FedAvg`` aggregates (one ArrayRecord, one MetricRecord with ``num-examples``).
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every cohort device gets the current cloud model."""
        self._layout = {key: tuple(arr.shape) for key, arr in arrays.items()}
        self._cloud = arrays
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.TRAIN, lambda pid: content)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average of the valid replies (weights = ``num-examples``, McMahan 2017 eq. 1)."""
        replies = list(replies)
        usable, weights = [], []
        for reply in replies:
            arrays = reply.content.array_records.get(ARRAYS_RECORD)
            problem = "no arrays" if arrays is None else same_layout(arrays, self._layout)
            if problem is None and (bad := has_non_finite(arrays)) is not None:
                problem = f"non-finite values in {bad}"
            if problem is not None:
                self.ledger.fail(self.partition_of(reply), "train", f"rejected reply: {problem}")
                self.ledger.completed.discard(self.partition_of(reply))
                continue
            usable.append(arrays)
            weights.append(float(reply.content[METRICS_RECORD][WEIGHT_KEY]))
        metrics = self.mean_metrics([r for r in replies if self.partition_of(r) in self.ledger.completed])
        if not usable:
            return None, metric_record(metrics)
        divergence = update_divergence(self._cloud, usable)
        if divergence is not None:
            metrics["update_divergence"] = divergence
        return self.combine(usable, weights), metric_record(metrics)

    def combine(self, updates: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
        """The new cloud model from the valid updates: their average weighted by ``weights``.

        Subclasses that aggregate otherwise (a median, a trimmed mean) override this alone; the
        reply checks, the failure ledger and the round's metrics stay FedAvg's.
        """
        return weighted_average(updates, weights)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The cohort evaluates the aggregated model on its local test data."""
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.EVALUATE, lambda pid: content)
