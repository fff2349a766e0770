"""Checks of the settings every run has: impossible values fail with one message naming the key and the fix.

Only what the schema itself can judge lives here (ranges, choices, relations between keys).
Each part of the house checks what only it knows: the data room its dataset and corruption
names (:mod:`experiments.data.checks`), the fleet its fault kinds
(:mod:`experiments.fleet.faults`), the network catalogue the model name
(:mod:`experiments.pretrain.networks`), and each algorithm its own settings
(``Algorithm.validate``); :func:`experiments.config.from_dict` runs them all.
"""

from __future__ import annotations

from typing import Any

from experiments.schema import ConfigError, EngineConfig, FaultsConfig, FleetConfig, RunConfig

#: Local optimisers of ``algorithm.optimizer`` (models/training.py).
OPTIMIZERS = ("adam", "sgd")
#: Pre-training learning-rate schedules (models/training.py).
SCHEDULES = ("constant", "onecycle")
#: Ways of splitting the edge part over devices (experiments/data/partition.py).
PARTITION_KINDS = ("label_skew", "dirichlet", "iid")
#: Where the ClientApps run (experiments/engine/).
BACKENDS = ("auto", "ray", "processes")
#: Corruption severities of the CIFAR-10-C recipe (Hendrycks & Dietterich 2019).
SEVERITIES = range(1, 6)


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise ConfigError ``"<key> <rule>, got <value>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


def validate(cfg: RunConfig) -> None:
    """Reject impossible values of the settings every run has (see the module docstring for the rest)."""
    require(cfg.seed >= 0, "seed", "must be >= 0", cfg.seed)
    require(cfg.rounds >= 1, "rounds", "must be >= 1", cfg.rounds)
    require(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: no checkpoints)", cfg.checkpoint_every)
    _validate_fleet(cfg.fleet)
    _validate_training(cfg)
    _validate_data(cfg)
    _validate_engine(cfg.engine)
    _validate_faults(cfg.faults)


def _validate_fleet(fleet: FleetConfig) -> None:
    require(fleet.devices >= 1, "fleet.devices", "must be >= 1", fleet.devices)
    require(fleet.per_round >= 1, "fleet.per_round", "must be >= 1", fleet.per_round)
    if fleet.per_round > fleet.devices:
        raise ConfigError(
            f"fleet.per_round={fleet.per_round} exceeds fleet.devices={fleet.devices}; "
            "lower fleet.per_round or raise fleet.devices"
        )
    require(fleet.load_max >= 1.0, "fleet.load_max", "must be >= 1 (a slow-down factor)", fleet.load_max)
    require(0.0 <= fleet.load_prob <= 1.0, "fleet.load_prob", "must be in [0, 1]", fleet.load_prob)
    require(
        0.0 < fleet.availability_min <= fleet.availability_max <= 1.0,
        "fleet.availability_min/max",
        "must satisfy 0 < min <= max <= 1",
        (fleet.availability_min, fleet.availability_max),
    )
    if fleet.deadline_s is not None:
        require(fleet.deadline_s > 0, "fleet.deadline_s", "must be > 0 or null", fleet.deadline_s)
    for name, weight in fleet.mix.items():
        require(weight >= 0, f"fleet.mix.{name}", "must be >= 0", weight)


def _validate_training(cfg: RunConfig) -> None:
    algo = cfg.algorithm
    require(algo.local_epochs >= 0, "algorithm.local_epochs", "must be >= 0", algo.local_epochs)
    require(algo.lr > 0, "algorithm.lr", "must be > 0", algo.lr)
    require(algo.batch_size >= 1, "algorithm.batch_size", "must be >= 1", algo.batch_size)
    require(algo.optimizer in OPTIMIZERS, "algorithm.optimizer", f"must be one of {OPTIMIZERS}", algo.optimizer)
    require(0.0 <= algo.momentum < 1.0, "algorithm.momentum", "must be in [0, 1)", algo.momentum)
    pre = cfg.pretrain
    require(pre.epochs >= 0, "pretrain.epochs", "must be >= 0", pre.epochs)
    require(pre.lr > 0, "pretrain.lr", "must be > 0", pre.lr)
    require(pre.batch_size >= 1, "pretrain.batch_size", "must be >= 1", pre.batch_size)
    require(pre.schedule in SCHEDULES, "pretrain.schedule", f"must be one of {SCHEDULES}", pre.schedule)
    model = cfg.model
    require(model.width >= 1, "model.width", "must be >= 1", model.width)
    for key in ("top_k", "modules_per_layer"):
        value = getattr(model, key)
        if value is not None:
            require(value >= 1, f"model.{key}", "must be >= 1 or null", value)
    if model.shrink is not None:
        require(0 < model.shrink <= 1, "model.shrink", "must be in (0, 1] or null", model.shrink)


def _validate_data(cfg: RunConfig) -> None:
    data, part, scen = cfg.dataset, cfg.dataset.partition, cfg.scenario
    require(0.0 < data.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)", data.test_fraction)
    require(0.0 < data.proxy_fraction < 1.0, "dataset.proxy_fraction", "must be in (0, 1)", data.proxy_fraction)
    require(data.proxy_samples >= 1, "dataset.proxy_samples", "must be >= 1", data.proxy_samples)
    require(data.global_test_samples >= 1, "dataset.global_test_samples", "must be >= 1", data.global_test_samples)
    require(part.kind in PARTITION_KINDS, "dataset.partition.kind", f"must be one of {PARTITION_KINDS}", part.kind)
    require(part.classes_per_device >= 1, "dataset.partition.classes_per_device", "must be >= 1",
            part.classes_per_device)
    require(part.alpha > 0, "dataset.partition.alpha", "must be > 0", part.alpha)
    require(
        1 <= part.size_min <= part.size_max,
        "dataset.partition.size_min/size_max",
        "must satisfy 1 <= size_min <= size_max",
        (part.size_min, part.size_max),
    )
    require(part.test_size >= 1, "dataset.partition.test_size", "must be >= 1", part.test_size)
    aug = data.augment
    for key in ("rotate_deg", "scale", "translate_px", "stroke_px"):
        require(getattr(aug, key) >= 0, f"dataset.augment.{key}", "must be >= 0", getattr(aug, key))
    require(0.0 <= scen.replace_fraction <= 1.0, "scenario.replace_fraction", "must be in [0, 1]",
            scen.replace_fraction)
    require(scen.slot_rounds >= 1, "scenario.slot_rounds", "must be >= 1", scen.slot_rounds)
    require(scen.severity in SEVERITIES, "scenario.severity", "must be in 1..5", scen.severity)
    require(scen.stream_batch >= 1, "scenario.stream_batch", "must be >= 1", scen.stream_batch)
    require(scen.batches_per_domain >= 1, "scenario.batches_per_domain", "must be >= 1", scen.batches_per_domain)


def _validate_engine(engine: EngineConfig) -> None:
    require(engine.backend in BACKENDS, "engine.backend", f"must be one of {BACKENDS}", engine.backend)
    if engine.backend == "processes":
        require(engine.ray_address is None, "engine.ray_address",
                "needs the Ray backend (a Ray cluster): set engine.backend=ray or engine.ray_address=null",
                engine.ray_address)
        require(engine.num_gpus == 0, "engine.num_gpus",
                "is a Ray resource: set engine.backend=ray to share GPUs between ClientApps", engine.num_gpus)
    require(engine.num_cpus > 0, "engine.num_cpus", "must be > 0", engine.num_cpus)
    require(engine.num_gpus >= 0, "engine.num_gpus", "must be >= 0", engine.num_gpus)
    require(engine.torch_threads >= 1, "engine.torch_threads", "must be >= 1", engine.torch_threads)
    require(engine.round_timeout_s > 0, "engine.round_timeout_s", "must be > 0", engine.round_timeout_s)


def _validate_faults(faults: FaultsConfig) -> None:
    require(0.0 <= faults.fraction <= 1.0, "faults.fraction", "must be in [0, 1]", faults.fraction)
    require(bool(faults.kinds), "faults.kinds", "must name at least one kind", faults.kinds)
    require(bool(faults.actions), "faults.actions", "must name at least one action", faults.actions)
    if faults.crash_server_round is not None:
        require(faults.crash_server_round >= 0, "faults.crash_server_round", "must be >= 0 or null",
                faults.crash_server_round)
