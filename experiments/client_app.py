"""The Flower ClientApp (the edge door): config + node_config -> device -> handler.

In simulation the device's data and budget come from its partition id (the fleet is
sampled lazily, one device at a time); on a real device under ``flower-supernode`` the
same app runs with the partition given by ``--node-config`` and the budget that config
declares, profiles or leaves to sampling (``experiments/fleet/node_budget.py``, ``docs/DEPLOY.md``).
Heavy work (data source, FLOP counting) is cached per process, so an actor pays for it
once, not per message; under ``flower-supernode`` each message is a fresh process, so the
FLOP count and a profiled budget are also kept in ``context.state`` (``node_memory.py``).
Online devices also save their ``context.state`` under ``<run dir>/devices`` so that a
resumed run can reload it (``experiments/resume/device_state.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.base import Device, StreamTensors
from experiments.algorithms import ALGORITHMS
from experiments.config import from_flat
from experiments.data import build_federated_data, stream, to_tensor
from experiments.fleet import budgets as fleet
from experiments.fleet import startup
from experiments.fleet.faults import TIMEOUT_OVERSHOOT, FaultInjector
from experiments.fleet.node_budget import device_budget
from experiments.fleet.node_memory import FLOPS_RECORD, remembered_number
from experiments.pretrain.networks import build_run_model
from experiments.resume.device_state import DeviceStateStore, device_state_dir
from experiments.schema import FaultsConfig, ModelConfig, RunConfig, config_hash
from models.costs import train_flops_per_sample
from models.training import TrainSettings

#: node_config keys Flower sets in simulation and that a real device passes with --node-config.
PARTITION_KEY = "partition-id"


def slot_of_round(cfg: RunConfig, server_round: int) -> int:
    """Time slot of a round (:func:`experiments.data.stream.slot_of_round`)."""
    return stream.slot_of_round(cfg.scenario, server_round)


@functools.lru_cache(maxsize=4)
def _flops_per_sample(model: ModelConfig, num_classes: int, shape: tuple[int, ...]) -> float:
    return train_flops_per_sample(build_run_model(model, num_classes, shape[0]), shape)


class DeviceParts:
    """A device's :class:`~clients.base.DeviceTensors` for one slot, each part rendered on first use.

    A device asked to evaluate reads only ``test_x``/``test_y`` and so renders only its local
    test set, not its training set (in simulation the evaluating actor is often not
    the one that trained the device, so its cache misses). Same values as rendering both.
    """

    def __init__(self, cfg: RunConfig, partition_id: int, slot: int) -> None:
        self._data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
        self._key = (partition_id, slot)

    @functools.cached_property
    def _train(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._data.device_train(*self._key)
        return to_tensor(x), torch.as_tensor(y, dtype=torch.long)

    @functools.cached_property
    def _test(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self._data.device_test(*self._key)
        return to_tensor(x), torch.as_tensor(y, dtype=torch.long)

    @property
    def train_x(self) -> torch.Tensor:  # noqa: D102
        return self._train[0]

    @property
    def train_y(self) -> torch.Tensor:  # noqa: D102
        return self._train[1]

    @property
    def test_x(self) -> torch.Tensor:  # noqa: D102
        return self._test[0]

    @property
    def test_y(self) -> torch.Tensor:  # noqa: D102
        return self._test[1]


def _stream_tensors(cfg: RunConfig, partition_id: int, index: int) -> StreamTensors:
    batch = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed).stream_batch(partition_id, index)
    return StreamTensors(
        x=to_tensor(batch.x),
        y=torch.as_tensor(batch.y, dtype=torch.long),
        pixels=batch.x,
        domain=batch.domain,
        index=batch.index,
    )


def _num_examples(cfg: RunConfig, partition_id: int, slot: int) -> int:
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    plan, _ = data.device_plan(partition_id, slot)
    return len(plan.rows)


def partition_of(node_config: Mapping[str, object], cfg: RunConfig) -> int:
    """The device's partition id from its node config, checked against the fleet size."""
    if PARTITION_KEY not in node_config:
        raise ValueError(f"node config has no {PARTITION_KEY!r}; start the SuperNode with --node-config 'partition-id=K'")
    pid = int(node_config[PARTITION_KEY])
    if not 0 <= pid < cfg.fleet.devices:
        raise ValueError(f"partition-id {pid} is outside the fleet of {cfg.fleet.devices} devices (fleet.devices)")
    return pid


def _no_load(server_round: int) -> float:
    return 1.0  # a real device's co-running load is real, not drawn


def _always_available(server_round: int) -> bool:
    return True  # a real device's outages are real, not drawn


def make_device(cfg: RunConfig, partition_id: int, context: Context | None = None,
                state_dir: Path | None = None) -> Device:
    """Everything a handler may use about device ``partition_id`` in run ``cfg``.

    With a ``context`` whose node config declares or profiles a budget (a real device),
    that budget is used, without simulated load or unavailability; otherwise the budget
    is sampled from the fleet table. ``state_dir``
    (:func:`experiments.resume.device_state.device_state_dir`): where the device saves its online
    state for a resumed run; None saves nothing.
    """
    store = None
    if state_dir is not None:
        store = DeviceStateStore(state_dir, partition_id, cfg.checkpoint_every, restore=cfg.resume)
    federated = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    real = None if context is None else device_budget(context)
    budget = real if real is not None else fleet.sample_budget(cfg.fleet, cfg.seed, partition_id)
    if real is None:
        load_factor = functools.partial(fleet.load_factor, cfg.fleet, cfg.seed, partition_id)
        is_available = functools.partial(fleet.is_available, budget, cfg.seed, partition_id)
    else:
        load_factor, is_available = _no_load, _always_available
    model, algo = cfg.model, cfg.algorithm
    shape = federated.image_shape
    flops_per_sample = remembered_number(
        context, FLOPS_RECORD, config_hash(model, {"classes": federated.num_classes, "shape": list(shape)}),
        lambda: _flops_per_sample(model, federated.num_classes, shape),
    )
    return Device(
        partition_id=partition_id,
        seed=cfg.seed,
        budget=budget.to_record(),
        data=functools.partial(DeviceParts, cfg, partition_id),
        num_examples=functools.partial(_num_examples, cfg, partition_id),
        build_model=functools.partial(build_run_model, model, federated.num_classes, federated.image_shape[0]),
        train=TrainSettings(algo.local_epochs, algo.lr, algo.batch_size, algo.optimizer, algo.momentum),
        flops_per_sample=flops_per_sample,
        load_factor=load_factor,
        is_available=is_available,
        slot_of_round=functools.partial(slot_of_round, cfg),
        options=ALGORITHMS[algo.name].client_options(cfg),
        stream=functools.partial(_stream_tensors, cfg, partition_id),
        state_store=store,
    )


def warm_process(cfg: RunConfig) -> None:
    """Fill this process's caches for ``cfg`` before its first message: the fleet's data source,
    its partition into devices and the network's FLOP count (a simulation worker's start-up)."""
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    _ = data.partitions
    _flops_per_sample(cfg.model, data.num_classes, data.image_shape)


def fault_injector(cfg: RunConfig) -> FaultInjector:
    """The run's injected faults (``cfg.faults``); a ``timeout`` device stalls past the round timeout."""
    return _fault_injector(cfg.faults, cfg.seed, cfg.engine.round_timeout_s)


@functools.lru_cache(maxsize=4)
def _fault_injector(faults: FaultsConfig, seed: int, round_timeout_s: float) -> FaultInjector:
    return FaultInjector(
        fraction=faults.fraction,
        kinds=faults.kinds,
        actions=faults.actions,
        seed=seed,
        stall_s=TIMEOUT_OVERSHOOT * round_timeout_s,
    )


def build_client_app(cfg: RunConfig | None = None, run_dir: Path | None = None) -> ClientApp:
    """The ClientApp; with ``cfg`` None it reads the run config Flower passes (``flwr run``).

    ``run_dir``: the run folder (the simulation engine's); without it, ``output_dir`` of the
    run config. Online devices save their state there for resumed runs.
    """
    app = ClientApp()

    def handle(action: str, msg: Message, context: Context) -> Message:
        startup.log_first_message(action, msg)
        run_cfg = cfg if cfg is not None else _config_from_context(context)
        torch.set_num_threads(run_cfg.engine.torch_threads)
        state_dir = device_state_dir(run_cfg, run_dir)
        device = make_device(run_cfg, partition_of(context.node_config, run_cfg), context, state_dir)
        handler = ALGORITHMS[run_cfg.algorithm.name].client(device)
        respond = functools.partial(handler.handle, action, msg, context)
        return fault_injector(run_cfg).handle(action, msg, device.partition_id, respond)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle("train", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle("evaluate", msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle("query", msg, context)

    return app


@functools.lru_cache(maxsize=4)
def _config_from_items(items: tuple) -> RunConfig:
    return from_flat(dict(items))


def _config_from_context(context: Context) -> RunConfig:
    return _config_from_items(tuple(sorted(context.run_config.items())))


app = build_client_app()
