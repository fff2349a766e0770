"""The plain-Flower baseline: Flower's built-in FedAvg and a minimal ClientApp.

What a Flower user writes without this project (the shape of Flower's
``quickstart-pytorch`` app): the ServerApp runs ``flwr.serverapp.strategy.FedAvg`` with
a global evaluation function; the ClientApp, per message, builds the network, loads the
received arrays, trains on its partition and replies. Model, data partition, local
training (:func:`models.training.train_epochs`), cohort size and Ray resources are the
project's, so the project's FedAvg and this app do the same work per round; only the
platform around it differs. Flower samples its cohort with its own unseeded
``random.sample`` over node ids (the cohort size matches, not the members).

It runs through ``experiments.engine.simulation.run_apps`` (the project's only call of Flower's
simulation API, a bare pass-through), never through the project's strategy or client.

``python -m experiments.bench.plain --config flat.json --out plain.json`` is run by
``experiments.bench.cli`` in a fresh process; it writes the wall-clock end of every round.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from experiments.config import from_flat
from experiments.data import build_federated_data, to_tensor
from experiments.pretrain.networks import build_run_model
from experiments.schema import RunConfig
from models.training import TrainSettings, accuracy, train_epochs

#: node_config key Flower's simulation sets on every virtual SuperNode.
PARTITION_KEY = "partition-id"
#: The metric Flower's FedAvg weights by (its ``weighted_by_key`` default).
WEIGHT_KEY = "num-examples"
#: The data slot every device trains on (its partition as it is at time 0).
PLAIN_SLOT = 0


def plain_backend_config(cfg: RunConfig) -> dict:
    """Ray resources per ClientApp and how to reach Ray: the same as ``experiments.engine.simulation``'s."""
    init_args: dict = {"address": cfg.engine.ray_address} if cfg.engine.ray_address else {}
    return {
        "client_resources": {"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus},
        "init_args": init_args,
    }


def plain_strategy(cfg: RunConfig) -> FedAvg:
    """Flower's FedAvg sampling ``fleet.per_round`` devices to train and as many to evaluate."""
    fraction = cfg.fleet.per_round / cfg.fleet.devices
    return FedAvg(
        fraction_train=fraction,
        fraction_evaluate=fraction,
        min_train_nodes=cfg.fleet.per_round,
        min_evaluate_nodes=cfg.fleet.per_round,
        min_available_nodes=cfg.fleet.devices,
    )


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.long)


def build_plain_server_app(cfg: RunConfig, round_ends: list[float]) -> ServerApp:
    """The ServerApp; ``round_ends`` receives the wall-clock end of round 0 (start) and each round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Flower's FedAvg from a fresh network, with a global evaluation after every round."""
        data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
        model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
        test_x, test_y = data.global_test()
        test_x, test_y = to_tensor(test_x), _labels(test_y)

        def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            """Accuracy on the global test set; stamps the round's end."""
            model.load_state_dict(arrays.to_torch_state_dict())
            record = MetricRecord({"accuracy": accuracy(model, test_x, test_y)})
            round_ends.append(time.time())
            return record

        plain_strategy(cfg).start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=cfg.rounds,
            timeout=cfg.engine.round_timeout_s,
            evaluate_fn=evaluate_global,
        )

    return app


def _local_data(cfg: RunConfig, context: Context) -> tuple[torch.Tensor, ...]:
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    device = data.device(int(context.node_config[PARTITION_KEY]), PLAIN_SLOT)
    return to_tensor(device.train_x), _labels(device.train_y), to_tensor(device.test_x), _labels(device.test_y)


def _received_model(cfg: RunConfig, msg: Message) -> torch.nn.Module:
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _seed_of(seed: int, pid: int, server_round: int) -> int:
    """Local-training seed of a device in a round (``clients.base.derive_seed``'s recipe)."""
    return int(np.random.SeedSequence([seed, pid, server_round]).generate_state(1)[0] >> 1)


def build_plain_client_app(cfg: RunConfig) -> ClientApp:
    """The minimal ClientApp: train on the local partition, evaluate on the local test set."""
    app = ClientApp()
    algo = cfg.algorithm
    settings = TrainSettings(algo.local_epochs, algo.lr, algo.batch_size, algo.optimizer, algo.momentum)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the received network on the local partition; reply with it."""
        torch.set_num_threads(cfg.engine.torch_threads)
        model = _received_model(cfg, msg)
        train_x, train_y, _, _ = _local_data(cfg, context)
        pid, server_round = int(context.node_config[PARTITION_KEY]), int(msg.content["config"]["server-round"])
        loss = train_epochs(model, train_x, train_y, settings, seed=_seed_of(cfg.seed, pid, server_round))
        metrics = MetricRecord({"train_loss": loss, WEIGHT_KEY: len(train_y)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Accuracy of the received network on the local test set."""
        torch.set_num_threads(cfg.engine.torch_threads)
        model = _received_model(cfg, msg)
        _, _, test_x, test_y = _local_data(cfg, context)
        metrics = MetricRecord({"accuracy": accuracy(model, test_x, test_y), WEIGHT_KEY: len(test_y)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def run_plain(cfg: RunConfig) -> dict:
    """Run the plain-Flower simulation of ``cfg``; the wall-clock end of every round.

    Returns
    -------
    dict
        ``start_unix`` (after the initial global evaluation, before round 1) and
        ``round_end_unix`` (one per round).
    """
    from experiments.engine.simulation import run_apps

    flwr_logger = logging.getLogger("flwr")  # Flower at WARNING, as the project runs it
    flwr_logger.setLevel(logging.DEBUG if cfg.engine.verbose else logging.WARNING)
    round_ends: list[float] = []
    run_apps(
        build_plain_server_app(cfg, round_ends),
        build_plain_client_app(cfg),
        num_supernodes=cfg.fleet.devices,
        backend=plain_backend_config(cfg),
        verbose=cfg.engine.verbose,
    )
    if len(round_ends) != cfg.rounds + 1:
        raise RuntimeError(f"the plain-Flower run finished {len(round_ends) - 1} of {cfg.rounds} rounds")
    return {"start_unix": round_ends[0], "round_end_unix": round_ends[1:]}


def main(argv: list[str] | None = None) -> None:
    """``--config`` a flat run config (JSON, ``experiments.config.to_flat``), ``--out`` the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="flat run config (JSON)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the timings (JSON)")
    args = parser.parse_args(argv)
    cfg = from_flat(json.loads(args.config.read_text()))
    args.out.write_text(json.dumps(run_plain(cfg), indent=2))


if __name__ == "__main__":
    main()
