"""The Flower ServerApp (the cloud door): config -> strategy + cloud data + output folder.

The cloud pre-trains (or loads from cache) its model on the proxy part, builds the
configured strategy with a global-test evaluation and a results sink, and runs it.
Whatever happens, ``results.json`` keeps every finished round and ends with a status.
Every ``checkpoint_every`` rounds the cloud model, the strategy's state and the round
records are checkpointed; ``resume=true`` continues from the newest checkpoint
(``experiments/resume/checkpointer.py``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from experiments.algorithms import ALGORITHMS
from experiments.config import from_flat
from experiments.data import build_federated_data, stream, to_tensor
from experiments.pretrain.cache import pretrained_model
from experiments.pretrain.networks import build_run_model
from experiments.results.phase_progress import phase
from experiments.results.progress import ProgressLine
from experiments.results.writer import ResultsWriter
from experiments.resume.checkpointer import DEVICE_STATE_SAVED, Checkpointer, devices_saved, start_or_resume
from experiments.resume.device_state import device_state_dir
from experiments.schema import RunConfig, to_dict
from models.training import accuracy

logger = logging.getLogger(__name__)
#: Checkpoint meta key of the pre-trained model's global accuracy (a summary figure).
PRETRAINED_ACCURACY = "pretrained_global_accuracy"


def default_run_dir() -> Path:
    """``outputs/<date>/<time>`` under the working directory (Hydra's layout)."""
    return Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")


def global_test_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The cloud's clean test set as (float images, int64 labels) tensors."""
    test_x, test_y = data.global_test()
    return to_tensor(test_x), torch.as_tensor(test_y, dtype=torch.long)


def pretrained_scorer(cfg: RunConfig, data, model: torch.nn.Module) -> Callable[[int, int], float]:
    """``(partition_id, round) -> accuracy`` of a frozen copy of the pre-trained ``model`` on the
    device's local test data of that round (what NA scores there; the simulation's data)."""
    frozen = copy.deepcopy(model)

    def score(partition_id: int, server_round: int) -> float:
        x, y, _ = data.device_test(partition_id, stream.slot_of_round(cfg.scenario, server_round))
        return accuracy(frozen, to_tensor(x), torch.as_tensor(y, dtype=torch.long))

    return score


def run_cloud(grid: Grid, cfg: RunConfig, run_dir: Path, device_dir: Path | None = None) -> dict:
    """Pre-train, run ``cfg.rounds`` rounds of the configured strategy, write results.

    With ``cfg.resume`` the run continues after the newest checkpoint in ``run_dir``;
    ``device_dir`` is where the devices save their online state (None: they do not).
    A refused resume raises ConfigError before anything in ``run_dir`` changes.
    """
    checkpoint = start_or_resume(cfg, run_dir, device_dir)
    config = to_dict(cfg) if checkpoint is None else checkpoint.config
    records = [] if checkpoint is None else checkpoint.records
    writer = ResultsWriter(run_dir, config, rounds=records)
    try:
        data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
        algorithm = ALGORITHMS[cfg.algorithm.name]
        model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
        algorithm.check_model(model)
        model = pretrained_model(cfg, model, data, algorithm.pretraining(cfg))
        background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-test")
        test_set = background.submit(global_test_tensors, data)

        def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            return MetricRecord({"accuracy": accuracy(model, *test_set.result())})

        progress = ProgressLine(cfg.rounds, seen=records)

        def on_round(record: dict) -> None:
            writer.add_round(record)
            progress.update(record)

        with phase(f"preparing the {cfg.algorithm.name} cloud"):
            strategy_args = algorithm.strategy_args(cfg, model, data)
        strategy = algorithm.strategy(
            **strategy_args,
            per_round=cfg.fleet.per_round,
            seed=cfg.seed,
            expected_devices=cfg.fleet.devices,
            deadline_s=cfg.fleet.deadline_s,
            on_round=on_round,
            pretrained_accuracy=pretrained_scorer(cfg, data, model) if algorithm.local_test else None,
        )
        # the cloud renders its test set and scores the pre-trained model while the devices
        # answer discovery, instead of before it (start-up time)
        pretrained = background.submit(lambda: accuracy(model, *test_set.result()))
        background.shutdown(wait=False)
        started = time.perf_counter()
        with phase(f"waiting for {cfg.fleet.devices} devices to report their budgets"):
            strategy.discover(grid, cfg.engine.round_timeout_s)
        discovery_s = time.perf_counter() - started
        pretrained_accuracy = pretrained.result()
        logger.info("%d devices reported their budgets in %.1f s", len(strategy.devices), discovery_s)
        arrays = ArrayRecord(model.state_dict())
        if checkpoint is not None:
            strategy.load_state_dict(checkpoint.strategy_state)
            strategy.resume_after(checkpoint.round)
            arrays = checkpoint.arrays
            # the run's own figure, even if the pre-training cache was rebuilt since
            pretrained_accuracy = checkpoint.meta.get(PRETRAINED_ACCURACY, pretrained_accuracy)
            logger.info("resumed after round %d of %d from %s", checkpoint.round, cfg.rounds, run_dir)
        meta = {DEVICE_STATE_SAVED: devices_saved(checkpoint, device_dir), PRETRAINED_ACCURACY: pretrained_accuracy}
        strategy.after_round = Checkpointer(run_dir, cfg, strategy, writer, config, meta)
        strategy.start(grid, arrays, cfg.rounds, timeout=cfg.engine.round_timeout_s, evaluate_fn=evaluate_global)
    except BaseException as exc:
        writer.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    extra = {
        "pretrained_global_accuracy": pretrained_accuracy,
        "devices_discovered": len(strategy.devices),
        "discovery_s": discovery_s,
    }
    return writer.finish("completed", extra_summary=extra)


def build_server_app(cfg: RunConfig | None = None, run_dir: Path | None = None) -> ServerApp:
    """The ServerApp; with ``cfg`` None it reads Flower's ``run_config`` (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else from_flat(context.run_config)
        out = run_dir or (Path(run_cfg.output_dir) if run_cfg.output_dir else default_run_dir())
        # where the ClientApps save device state: the engine's run folder, else output_dir
        device_dir = device_state_dir(run_cfg, run_dir)
        run_cloud(grid, run_cfg, out, device_dir)

    return app


app = build_server_app()
