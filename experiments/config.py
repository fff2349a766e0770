"""One typed schema for a run, built from a Hydra config or a Flower ``run_config``.

Both doors (``python -m experiments.run`` with Hydra, ``flwr run .`` with Flower's flat
``run_config``) end in the same frozen :class:`~experiments.schema.RunConfig`. Unknown keys,
wrong types and impossible values are rejected here, with one message that names the key and
the fix, before the simulation starts: the common checks (:mod:`experiments.validation`), the
data room's, the fleet's, the network catalogue's and the algorithm's own.

An algorithm's settings live in the block its plug-in names (``algorithm.eclm.*``); the
block becomes the plug-in's options dataclass in ``cfg.algorithm.options``. Flower's flat
table lists every algorithm's block (its keys must all exist); the blocks of the algorithms
a run does not select are dropped after their keys are checked.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.algorithms import ALGORITHMS, algorithm_named, option_keys
from experiments.algorithms.plugin import Algorithm
from experiments.data.partition import with_scenario_partition
from experiments.data.settings import check_data_settings
from experiments.fleet.faults import check_faults
from experiments.pretrain.networks import check_model_name
from experiments.schema import (
    PLUGIN_BUILT,
    AlgorithmConfig,
    ConfigError,
    EngineConfig,
    RunConfig,
    ScenarioConfig,
    to_dict,
)
from experiments.validation import validate

#: The algorithm a run without ``algorithm.name`` selects (the schema's default).
DEFAULT_ALGORITHM = AlgorithmConfig().name
#: What ``model.name``, ``scenario.name`` and ``dataset.partition.kind`` say to take the algorithm's
#: (or the scenario's) own choice.
AUTO = "auto"
#: Hydra's config tree; a scenario's named file is ``conf/scenario/<name>.yaml``.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# --------------------------------------------------------------------------- building
def from_dict(raw: Mapping[str, Any], resolve_model: bool = True) -> RunConfig:
    """Build and check a :class:`RunConfig` from a nested mapping (Hydra's, after resolve).

    ``resolve_model`` resolves every ``auto`` (the algorithm's network and scenario, the
    scenario's partition; a named scenario's unset values from its file) and runs every check
    (off only to write the flat defaults Flower keeps, where ``auto`` must stay ``auto``).
    """
    raw = dict(raw or {})
    algorithm_raw = dict(raw.get("algorithm") or {})
    algorithm = algorithm_named(str(algorithm_raw.get("name", DEFAULT_ALGORITHM)))
    options = _options(algorithm, algorithm_raw)
    raw["algorithm"] = algorithm_raw
    cfg = _build(RunConfig, raw, "")
    cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, options=options))
    if not resolve_model:
        return cfg
    cfg = resolve_partition(resolve_scenario(resolve_auto_model(cfg)))
    check(cfg)
    return cfg


def _options(algorithm: Algorithm, algorithm_raw: dict[str, Any]) -> Any:
    """Pop every algorithm's settings block from ``algorithm_raw``; build the selected one's."""
    blocks = {key: algorithm_raw.pop(key) for key in option_keys() if key in algorithm_raw}
    for key, block in blocks.items():
        owner = next(a for a in ALGORITHMS.values() if a.options_key == key)
        _build(owner.options, block, f"algorithm.{key}")  # the keys of an unselected block must exist too
    if algorithm.options is None:
        return None
    return _build(algorithm.options, blocks.get(algorithm.options_key), f"algorithm.{algorithm.options_key}")


def check(cfg: RunConfig) -> None:
    """Every check of a built config: common values, data, faults, network name, the algorithm's own."""
    validate(cfg)
    check_data_settings(cfg)
    check_faults(cfg.faults)
    check_model_name(cfg.model)
    ALGORITHMS[cfg.algorithm.name].validate(cfg)


def resolve_auto_model(cfg: RunConfig) -> RunConfig:
    """``model.name=auto`` becomes the algorithm's own network (e.g. ECLM's modular ResNet18)."""
    if cfg.model.name != AUTO:
        return cfg
    network = ALGORITHMS[cfg.algorithm.name].default_model
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=network))


def resolve_scenario(cfg: RunConfig) -> RunConfig:
    """The scenario with ``auto`` and unset values resolved.

    ``scenario.name=auto`` becomes the algorithm's own setting (its plug-in's
    ``default_scenario``); every value left null comes from ``conf/scenario/<name>.yaml``, and a
    value given explicitly wins over the file's.
    """
    scenario = cfg.scenario
    name = ALGORITHMS[cfg.algorithm.name].default_scenario if scenario.name == AUTO else scenario.name
    given = {f.name: getattr(scenario, f.name) for f in dataclasses.fields(scenario) if f.name != "name"}
    return dataclasses.replace(cfg, scenario=scenario_named(name, **{k: v for k, v in given.items() if v is not None}))


def scenario_named(name: str, **values: Any) -> ScenarioConfig:
    """The scenario of ``conf/scenario/<name>.yaml``, with ``values`` in place of the file's.

    Raises
    ------
    ConfigError
        When there is no such file (the message lists the scenarios there are).
    """
    from omegaconf import OmegaConf

    path = CONF_DIR / "scenario" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml") if p.stem != AUTO)
        raise ConfigError(f"scenario={name!r} has no file conf/scenario/{name}.yaml; choose from {choices}")
    base = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return _build(ScenarioConfig, {**base, **values, "name": name}, "scenario")


def resolve_partition(cfg: RunConfig) -> RunConfig:
    """``dataset.partition.kind=auto`` becomes the scenario's own (``scenario.partition``)."""
    return dataclasses.replace(cfg, dataset=with_scenario_partition(cfg.dataset, cfg.scenario))


def from_hydra(cfg: Any) -> RunConfig:
    """Build from a Hydra/OmegaConf config (keys under ``hydra`` are ignored)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    return from_dict(raw)


def compose(overrides: Sequence[str] = ()) -> RunConfig:
    """The :class:`RunConfig` ``python -m experiments.run <overrides>`` runs (``conf/`` composed by Hydra)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = hydra_compose(config_name="config", overrides=[*overrides, "output_dir=null"])
    return from_hydra(raw)


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


def resolved_backend(engine: EngineConfig) -> str:
    """``engine.backend`` with ``auto`` resolved: Ray for a Ray cluster or GPUs, else local processes.

    Measured on 2 cores (docs/PERFORMANCE.md): the process backend starts faster, rounds cost
    less and the process tree needs less memory; Ray spreads ClientApps over a cluster's nodes
    and shares GPUs by fractions.
    """
    if engine.backend != "auto":
        return engine.backend
    return "ray" if engine.ray_address is not None or engine.num_gpus > 0 else "processes"


def to_flat(cfg: RunConfig) -> dict[str, Any]:
    """The config as Flower's flat ``run_config`` (inverse of :func:`from_flat`)."""
    return flatten(to_dict(cfg))


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested plain data as flat dotted keys; lists become comma-separated strings, None ``""``."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        elif isinstance(value, list):
            flat[dotted] = ",".join(str(v) for v in value)
        else:
            flat[dotted] = "" if value is None else value  # TOML has no null
    return flat


# --------------------------------------------------------------------------- typing
def _build(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get(PLUGIN_BUILT)}
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
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if (value is None or value == "") and type(None) in args:  # "" is null in flat configs
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is tuple:
        from_text = isinstance(value, str)  # a flat run_config list: "a,b,c"
        items = [v.strip() for v in value.split(",") if v.strip()] if from_text else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if from_text and args[0] in (int, float):
            items = [_number(args[0], v, path) for v in items]
        return tuple(_coerce(args[0], v, path) for v in items)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    return _scalar(hint, value, path)


def _number(kind: type, text: str, path: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{path} must be a list of {kind.__name__}s, got item {text!r}") from None


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
