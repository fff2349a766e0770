"""One typed schema for a run, built from a Hydra config or a Flower ``run_config``.

Both doors (``python -m experiments.run`` with Hydra, ``flwr run .`` with Flower's flat
``run_config``) end in the same frozen :class:`RunConfig`. Unknown keys, wrong types and
impossible values are rejected here, with one message that names the key and the fix,
before Ray starts.

Every default below carries its source in the comment beside it; the Hydra tree in
``conf/`` repeats them so that ``--cfg job`` shows a complete run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the key and the fix."""


# --------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class AugmentConfig:
    """Label-preserving augmentation used to expand the embedded digits."""

    rotate_deg: float = 10.0  # small affine jitter (issue #2); +-10 deg keeps 6/9 apart
    scale: float = 0.1  # relative zoom jitter, +-10 %
    translate_px: float = 2.0  # shift at 32x32, +-2 px
    stroke_px: int = 1  # stroke width change: dilation/erosion radius up to this


@dataclass(frozen=True)
class PartitionConfig:
    """How the edge part is split over devices (ECLM section 7.1)."""

    kind: str = "label_skew"  # label_skew | dirichlet | iid
    classes_per_device: int = 2  # ECLM 7.1: each device holds m of n classes (m=2 on CIFAR-10)
    alpha: float = 0.5  # Dirichlet concentration (common non-IID default, Hsu et al. 2019)
    size_min: int = 50  # ECLM 7.1: 50-150 samples per device
    size_max: int = 150
    test_size: int = 30  # local held-out test samples per device, same label mix as its data


@dataclass(frozen=True)
class DatasetConfig:
    """Dataset and its split into cloud proxy, edge and held-out test parts."""

    name: str = "digits"  # digits | cifar10 | cifar100
    root: str | None = None  # folder holding CIFAR files (digits needs none)
    download: bool = False  # let torchvision fetch CIFAR into root (never in tests/CI)
    test_fraction: float = 0.2  # originals kept for testing only
    proxy_fraction: float = 0.3  # ECLM 7.2: 30 % of training data is the cloud proxy set
    proxy_samples: int = 3000  # augmented proxy samples the cloud pre-trains on
    global_test_samples: int = 1000  # augmented renders of the test originals (cloud test set)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass(frozen=True)
class ScenarioConfig:
    """Dynamics of the edge environment over time slots (ECLM 2.1, 7.3)."""

    name: str = "one_step"
    replace_fraction: float = 0.0  # ECLM 2.1: 0.2 per slot; 7.3: 0.5 per slot
    slot_rounds: int = 1  # rounds per time slot
    corruptions: tuple[str, ...] = ()  # domain of each slot's new data, cycled; () = clean
    severity: int = 3  # corruption severity 1-5 (CIFAR-10-C recipe)


@dataclass(frozen=True)
class FleetConfig:
    """Size of the simulated fleet and how device budgets are drawn."""

    devices: int = 100  # ARCHITECTURE.md: default run simulates 100 devices
    per_round: int = 10  # cohort size per round
    mix: Mapping[str, float] = field(default_factory=dict)  # device class -> weight; {} = uniform
    load_max: float = 5.0  # ECLM Fig. 1b: co-running apps slow training up to ~5x
    load_prob: float = 0.3  # chance that a device has co-running apps in a round
    availability_min: float = 0.9  # per-device probability of answering a round
    availability_max: float = 1.0
    deadline_s: float | None = None  # drop stragglers slower than this (virtual seconds)


@dataclass(frozen=True)
class ModelConfig:
    """The network the cloud pre-trains and devices adapt."""

    name: str = "cnn"  # registered in models/ (cnn | mlp)
    width: int = 16  # channels of the first conv stage / hidden units (cnn: ~24k parameters)


@dataclass(frozen=True)
class AlgorithmConfig:
    """The adaptation algorithm and its local-training settings."""

    name: str = "fedavg"  # registered in experiments/algorithms.py
    local_epochs: int = 3  # ECLM 7.1: 3 local epochs per round
    lr: float = 1e-3  # ECLM 7.1
    batch_size: int = 16  # ECLM 7.1
    optimizer: str = "adam"  # sgd | adam; ECLM does not name it, Adam suits lr 1e-3
    momentum: float = 0.9  # for sgd


@dataclass(frozen=True)
class PretrainConfig:
    """Cloud pre-training on the proxy part, cached on disk by config hash."""

    epochs: int = 10  # converges the default CNN on the digits proxy part (test acc ~0.97)
    lr: float = 3e-3  # peak rate of the one-cycle schedule
    batch_size: int = 64
    schedule: str = "onecycle"  # constant | onecycle
    cache_dir: str = "~/.cache/edgecloud"


@dataclass(frozen=True)
class EngineConfig:
    """Flower simulation engine: Ray resources and guards against hangs."""

    ray_address: str | None = None  # None: start a local Ray; "auto": attach to `ray start --head`
    num_cpus: float = 1.0  # per ClientApp; on 2 cores two actors are fastest
    num_gpus: float = 0.0  # per ClientApp; CPU is the default
    torch_threads: int = 1  # torch threads inside each ClientApp
    round_timeout_s: float = 300.0  # a reply later than this counts as a failure
    verbose: bool = False  # Flower's own INFO logs


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; frozen, hashable into a cache key."""

    seed: int = 0
    rounds: int = 10
    output_dir: str | None = None  # where results go; Hydra sets its run dir, None: outputs/<time>
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# --------------------------------------------------------------------------- building
def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested mapping (Hydra's, after resolve)."""
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def from_hydra(cfg: Any) -> RunConfig:
    """Build from a Hydra/OmegaConf config (keys under ``hydra`` are ignored)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    return from_dict(raw)


def from_flat(run_config: Mapping[str, Any]) -> RunConfig:
    """Build from Flower's flat ``run_config`` (``"fleet.devices": 20``, ...).

    Lists travel as comma-separated strings (``"scenario.corruptions": "fog,snow"``).
    """
    nested: dict[str, Any] = {}
    for dotted, value in run_config.items():
        node = nested
        *parents, leaf = str(dotted).split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {dotted!r} nests under a value; check the key spelling")
        node[leaf] = value
    return from_dict(nested)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain nested JSON-able data (the ``config`` of results.json)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def to_flat(cfg: RunConfig) -> dict[str, Any]:
    """The config as Flower's flat ``run_config`` (inverse of :func:`from_flat`)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        elif isinstance(value, list):
            flat[prefix] = ",".join(str(v) for v in value)
        else:
            flat[prefix] = "" if value is None else value  # TOML has no null

    walk("", to_dict(cfg))
    return flat


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (dataclasses or plain data), for cache keys."""
    data = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- typing
def _build(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = path or "the top level"
        raise ConfigError(
            f"unknown config key {_join(path, unknown[0])!r} at {where}; valid keys: {sorted(names)}"
        )
    values = {name: _coerce(hints[name], raw[name], _join(path, name)) for name in names if name in raw}
    return cls(**values)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if (value is None or value == "") and type(None) in args:  # "" is null in flat configs
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v.strip() if isinstance(v, str) else v, path) for v in items if v != "")
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    return _scalar(hint, value, path)


def _scalar(hint: type, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {hint}")


# --------------------------------------------------------------------------- meaning
def validate(cfg: RunConfig) -> None:
    """Reject impossible values with one message naming the key and the fix."""
    _check(cfg.seed >= 0, "seed", "must be >= 0", cfg.seed)
    _check(cfg.rounds >= 1, "rounds", "must be >= 1", cfg.rounds)
    fleet = cfg.fleet
    _check(fleet.devices >= 1, "fleet.devices", "must be >= 1", fleet.devices)
    _check(fleet.per_round >= 1, "fleet.per_round", "must be >= 1", fleet.per_round)
    if fleet.per_round > fleet.devices:
        raise ConfigError(
            f"fleet.per_round={fleet.per_round} exceeds fleet.devices={fleet.devices}; "
            "lower fleet.per_round or raise fleet.devices"
        )
    _check(fleet.load_max >= 1.0, "fleet.load_max", "must be >= 1 (a slow-down factor)", fleet.load_max)
    _check(0.0 <= fleet.load_prob <= 1.0, "fleet.load_prob", "must be in [0, 1]", fleet.load_prob)
    _check(
        0.0 < fleet.availability_min <= fleet.availability_max <= 1.0,
        "fleet.availability_min/max",
        "must satisfy 0 < min <= max <= 1",
        (fleet.availability_min, fleet.availability_max),
    )
    if fleet.deadline_s is not None:
        _check(fleet.deadline_s > 0, "fleet.deadline_s", "must be > 0 or null", fleet.deadline_s)
    for name, weight in fleet.mix.items():
        _check(weight >= 0, f"fleet.mix.{name}", "must be >= 0", weight)
    _validate_training(cfg)
    _validate_data(cfg)
    _validate_engine(cfg.engine)
    _validate_names(cfg)


def _validate_training(cfg: RunConfig) -> None:
    algo = cfg.algorithm
    _check(algo.local_epochs >= 0, "algorithm.local_epochs", "must be >= 0", algo.local_epochs)
    _check(algo.lr > 0, "algorithm.lr", "must be > 0", algo.lr)
    _check(algo.batch_size >= 1, "algorithm.batch_size", "must be >= 1", algo.batch_size)
    _check(algo.optimizer in ("adam", "sgd"), "algorithm.optimizer", "must be 'adam' or 'sgd'", algo.optimizer)
    _check(0.0 <= algo.momentum < 1.0, "algorithm.momentum", "must be in [0, 1)", algo.momentum)
    pre = cfg.pretrain
    _check(pre.epochs >= 0, "pretrain.epochs", "must be >= 0", pre.epochs)
    _check(pre.lr > 0, "pretrain.lr", "must be > 0", pre.lr)
    _check(pre.batch_size >= 1, "pretrain.batch_size", "must be >= 1", pre.batch_size)
    schedules = ("constant", "onecycle")
    _check(pre.schedule in schedules, "pretrain.schedule", f"must be one of {schedules}", pre.schedule)
    _check(cfg.model.width >= 1, "model.width", "must be >= 1", cfg.model.width)


def _validate_data(cfg: RunConfig) -> None:
    data, part, scen = cfg.dataset, cfg.dataset.partition, cfg.scenario
    _check(0.0 < data.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)", data.test_fraction)
    _check(0.0 < data.proxy_fraction < 1.0, "dataset.proxy_fraction", "must be in (0, 1)", data.proxy_fraction)
    _check(data.proxy_samples >= 1, "dataset.proxy_samples", "must be >= 1", data.proxy_samples)
    _check(data.global_test_samples >= 1, "dataset.global_test_samples", "must be >= 1", data.global_test_samples)
    kinds = ("label_skew", "dirichlet", "iid")
    _check(part.kind in kinds, "dataset.partition.kind", f"must be one of {kinds}", part.kind)
    _check(part.classes_per_device >= 1, "dataset.partition.classes_per_device", "must be >= 1", part.classes_per_device)
    _check(part.alpha > 0, "dataset.partition.alpha", "must be > 0", part.alpha)
    _check(
        1 <= part.size_min <= part.size_max,
        "dataset.partition.size_min/size_max",
        "must satisfy 1 <= size_min <= size_max",
        (part.size_min, part.size_max),
    )
    _check(part.test_size >= 1, "dataset.partition.test_size", "must be >= 1", part.test_size)
    aug = data.augment
    for key in ("rotate_deg", "scale", "translate_px", "stroke_px"):
        _check(getattr(aug, key) >= 0, f"dataset.augment.{key}", "must be >= 0", getattr(aug, key))
    _check(0.0 <= scen.replace_fraction <= 1.0, "scenario.replace_fraction", "must be in [0, 1]", scen.replace_fraction)
    _check(scen.slot_rounds >= 1, "scenario.slot_rounds", "must be >= 1", scen.slot_rounds)
    _check(1 <= scen.severity <= 5, "scenario.severity", "must be in 1..5", scen.severity)


def _validate_engine(engine: EngineConfig) -> None:
    _check(engine.num_cpus > 0, "engine.num_cpus", "must be > 0", engine.num_cpus)
    _check(engine.num_gpus >= 0, "engine.num_gpus", "must be >= 0", engine.num_gpus)
    _check(engine.torch_threads >= 1, "engine.torch_threads", "must be >= 1", engine.torch_threads)
    _check(engine.round_timeout_s > 0, "engine.round_timeout_s", "must be > 0", engine.round_timeout_s)


def _validate_names(cfg: RunConfig) -> None:
    """Names that must exist in a registry (imported lazily: they pull in torch)."""
    from experiments.algorithms import ALGORITHMS
    from models import model_names

    if cfg.algorithm.name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm.name {cfg.algorithm.name!r}; choose one of {sorted(ALGORITHMS)}")
    if cfg.model.name not in model_names():
        raise ConfigError(f"unknown model.name {cfg.model.name!r}; choose one of {list(model_names())}")
    datasets = ("digits", "cifar10", "cifar100")
    _check(cfg.dataset.name in datasets, "dataset.name", f"must be one of {datasets}", cfg.dataset.name)
    if cfg.scenario.corruptions:
        from experiments.data.corruptions import CORRUPTIONS

        for name in cfg.scenario.corruptions:
            if name not in CORRUPTIONS:
                raise ConfigError(f"unknown corruption {name!r} in scenario.corruptions; choose from {list(CORRUPTIONS)}")


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")
