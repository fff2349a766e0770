"""Validation of the data-room configuration: one clear ValueError per bad value.

``ConfigError`` (a ``ValueError``) names the key, the bad value and the fix, and is raised
before anything is loaded or rendered.
"""

from __future__ import annotations

import operator

from experiments.data.partition import PARTITION_KINDS
from experiments.schema import ConfigError, DatasetConfig, ScenarioConfig

DATASET_NAMES = ("digits", "cifar10", "cifar100")
SEVERITIES = (1, 2, 3, 4, 5)  # CIFAR-10-C severities (Hendrycks & Dietterich 2019)


def check_config(
    dataset: DatasetConfig, scenario: ScenarioConfig, num_devices: int, seed: int
) -> None:
    """Reject configurations the data room cannot serve.

    Raises
    ------
    ValueError
        ``ConfigError`` naming the first bad key and its fix.
    """
    if dataset.name not in DATASET_NAMES:
        raise ConfigError(f"dataset.name={dataset.name!r} is unknown; use one of {DATASET_NAMES}")
    _check_int(num_devices, "number of devices (fleet.devices)", 1)
    _check_int(seed, "seed", 0)  # numpy seed sequences take non-negative integers
    for key in ("test_fraction", "proxy_fraction"):
        value = getattr(dataset, key)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"dataset.{key}={value} must lie strictly between 0 and 1")
    _check_int(dataset.proxy_samples, "dataset.proxy_samples", 1)
    _check_int(dataset.global_test_samples, "dataset.global_test_samples", 1)
    _check_augment(dataset)
    _check_partition(dataset)
    check_scenario(scenario)


def _check_int(value: int, key: str, minimum: int) -> None:
    """Reject a non-integer or an integer below ``minimum``."""
    number = _as_int(value)
    if number is None or number < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def _check_augment(dataset: DatasetConfig) -> None:
    """Reject negative jitter ranges and zooms that could flip or vanish a digit."""
    augment = dataset.augment
    for key in ("rotate_deg", "translate_px"):
        if getattr(augment, key) < 0:
            raise ConfigError(f"dataset.augment.{key}={getattr(augment, key)} must be >= 0")
    if not 0.0 <= augment.scale < 1.0:
        raise ConfigError(f"dataset.augment.scale={augment.scale} must lie in [0, 1)")
    _check_int(augment.stroke_px, "dataset.augment.stroke_px", 0)


def _check_partition(dataset: DatasetConfig) -> None:
    """Reject impossible device sizes, class counts and Dirichlet concentrations."""
    partition = dataset.partition
    if partition.kind not in PARTITION_KINDS:
        raise ConfigError(
            f"dataset.partition.kind={partition.kind!r} is unknown; use one of {PARTITION_KINDS}"
        )
    _check_int(partition.size_min, "dataset.partition.size_min", 1)
    _check_int(partition.size_max, "dataset.partition.size_max", 1)
    if partition.size_min > partition.size_max:
        raise ConfigError(
            f"dataset.partition.size_min={partition.size_min} exceeds size_max="
            f"{partition.size_max}; make size_min <= size_max"
        )
    _check_int(partition.test_size, "dataset.partition.test_size", 0)
    if partition.kind == "label_skew":
        m = partition.classes_per_device
        _check_int(m, "dataset.partition.classes_per_device", 1)
        if partition.size_min < m:
            raise ConfigError(
                f"dataset.partition.size_min={partition.size_min} cannot hold "
                f"classes_per_device={m} classes; raise size_min to >= {m}"
            )
    if partition.kind == "dirichlet" and not partition.alpha > 0:
        raise ConfigError(f"dataset.partition.alpha={partition.alpha} must be > 0")


def check_classes(dataset: DatasetConfig, num_classes: int) -> None:
    """Reject label skew asking for more classes per device than the dataset has."""
    m = dataset.partition.classes_per_device
    if dataset.partition.kind == "label_skew" and m > num_classes:
        raise ConfigError(
            f"dataset.partition.classes_per_device={m} exceeds the {num_classes} classes "
            f"of {dataset.name}; use at most {num_classes}"
        )


def check_scenario(scenario: ScenarioConfig) -> None:
    """Reject a replace fraction outside [0, 1], a bad severity, an unknown corruption, or
    an online stream batch or domain length below 1."""
    if not 0.0 <= scenario.replace_fraction <= 1.0:
        raise ConfigError(
            f"scenario.replace_fraction={scenario.replace_fraction} must lie in [0, 1]"
        )
    if scenario.corruptions:  # their module imports scipy.ndimage (0.4-0.8 s): only when needed
        from experiments.data.corruptions import CORRUPTIONS
    for name in scenario.corruptions:
        if name not in CORRUPTIONS:
            raise ConfigError(
                f"scenario.corruptions holds unknown corruption {name!r}; use names from "
                f"{', '.join(CORRUPTIONS)}"
            )
    if scenario.corruptions and scenario.severity not in SEVERITIES:
        raise ConfigError(f"scenario.severity={scenario.severity!r} must be one of {SEVERITIES}")
    _check_int(scenario.stream_batch, "scenario.stream_batch", 1)
    _check_int(scenario.batches_per_domain, "scenario.batches_per_domain", 1)


def check_device(partition_id: int, slot: int, num_devices: int) -> tuple[int, int]:
    """Reject a partition id outside [0, num_devices) or a negative slot.

    Returns
    -------
    tuple of int
        ``(partition_id, slot)`` as Python ints (numpy integers are accepted).
    """
    pid = _as_int(partition_id)
    if pid is None or not 0 <= pid < num_devices:
        raise ValueError(
            f"partition_id={partition_id!r} is out of range; use an integer in [0, {num_devices})"
        )
    return pid, check_slot(slot)


def check_index(index: int) -> int:
    """Reject a stream batch index that is not an integer >= 0; return it as a Python int."""
    i = _as_int(index)
    if i is None or i < 0:
        raise ValueError(f"index={index!r} must be an integer >= 0 (a stream batch position)")
    return i


def check_slot(slot: int) -> int:
    """Reject a slot that is not an integer >= 0; return it as a Python int."""
    t = _as_int(slot)
    if t is None or t < 0:
        raise ValueError(f"slot={slot!r} must be an integer >= 0")
    return t


def _as_int(value) -> int | None:
    """An integer (Python or numpy, not bool) as int; anything else as None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
