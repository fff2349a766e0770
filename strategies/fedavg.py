"""FedAvg (McMahan et al., 2017) on the edge-cloud base."""

from __future__ import annotations

from flwr.app import MessageType, RecordDict

from strategies.aggregate import has_non_finite, same_layout, update_divergence, weighted_average
from strategies.base import EdgeCloudStrategy


class FedAvg(EdgeCloudStrategy):
    """Each cohort device trains the cloud model; the cloud averages by data size.

    After aggregation the same cohort evaluates the new cloud model on its held-out
    local data: that is the round's ``accuracy``.
    """

    def configure_train(self, server_round, arrays, config, grid):
        """Every cohort device gets the current cloud model."""
        self._layout = {key: tuple(arr.shape) for key, arr in arrays.items()}
        self._cloud = arrays
        content = RecordDict({"arrays": arrays, "config": self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.TRAIN, lambda pid: content)

    def aggregate_train(self, server_round, replies):
        """Weighted average of the valid replies (weights = num_examples)."""
        usable, weights = [], []
        for reply in replies:
            arrays = reply.content.array_records.get("arrays")
            problem = "no arrays" if arrays is None else same_layout(arrays, self._layout)
            if problem is None and (bad := has_non_finite(arrays)) is not None:
                problem = f"non-finite values in {bad}"
            if problem is not None:
                self.ledger.fail(self.partition_of(reply), "train", f"rejected reply: {problem}")
                self.ledger.completed.discard(self.partition_of(reply))
                continue
            usable.append(arrays)
            weights.append(float(reply.content["metrics"]["num_examples"]))
        metrics = self.mean_metrics([r for r in replies if self.partition_of(r) in self.ledger.completed])
        if not usable:
            return None, metrics or None
        divergence = update_divergence(self._cloud, usable)
        if divergence is not None:
            metrics["update_divergence"] = divergence
        return weighted_average(usable, weights), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        """The cohort evaluates the aggregated model on its local test data."""
        content = RecordDict({"arrays": arrays, "config": self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.EVALUATE, lambda pid: content)
