"""Edge handlers that train the received model on local data (FedAvg's client and LA)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message

from clients.base import ClientHandler, content_reply, derive_seed, model_from, round_of
from clients.protocol import (
    ACCURACY_KEY,
    COMPUTE_TIME_KEY,
    PARTITION_KEY,
    SAMPLES_TRAINED_KEY,
    TEST_EXAMPLES_KEY,
    WEIGHT_KEY,
)
from models.training import accuracy, train_epochs


class LocalTrainingClient(ClientHandler):
    """Train the received model on the device's data and send it back (FedAvg, McMahan 2017).

    The reply's ``accuracy`` is the trained model's accuracy on the device's held-out local
    test data; ``accuracy_before`` is the received model's. It carries one ArrayRecord and one
    MetricRecord weighted by ``num-examples`` (the training set's size), so Flower's own
    ``FedAvg`` aggregates it as the project's does.
    """

    send_arrays = True

    def train(self, msg: Message, context: Context) -> Message:
        """One local training pass; reply with arrays (if ``send_arrays``) and metrics."""
        server_round = round_of(msg)
        device = self.device
        model = model_from(msg, device)
        data = device.data(device.slot_of_round(server_round))
        before = accuracy(model, data.test_x, data.test_y)
        loss = train_epochs(
            model,
            data.train_x,
            data.train_y,
            device.train,
            seed=derive_seed(device.seed, device.partition_id, server_round),
        )
        samples = len(data.train_y) * device.train.epochs
        metrics = {
            WEIGHT_KEY: len(data.train_y),
            TEST_EXAMPLES_KEY: len(data.test_y),
            ACCURACY_KEY: accuracy(model, data.test_x, data.test_y),
            "accuracy_before": before,
            "train_loss": loss,
            SAMPLES_TRAINED_KEY: samples,
            COMPUTE_TIME_KEY: self.compute_time_s(samples, server_round),
            "load_factor": device.load_factor(server_round),
            PARTITION_KEY: device.partition_id,
        }
        arrays = ArrayRecord(model.state_dict()) if self.send_arrays else None
        return content_reply(msg, metrics, arrays=arrays)


class LocalOnlyClient(LocalTrainingClient):
    """LA (ECLM 7.1): fine-tune the cloud model on local data only; nothing goes back up."""

    send_arrays = False
