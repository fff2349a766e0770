"""The simulated fleet: seeded per-device budgets and per-round fluctuation.

A device is known by its partition id. Its budget (training memory, compute speed, link
bandwidth, availability) is drawn from its device class (``experiments/fleet/classes.py``,
re-exported here) by a generator seeded with ``(seed, partition_id, stream tag)`` only, so a
budget is cheap to draw on demand, never needs a fleet-wide table and does not change with the
fleet's size. Per round a device may be slowed by co-running apps (ECLM Fig. 1b: up to ~5x) and
may not answer at all.

The virtual clock that turns these budgets into seconds is in ``models/clock.py``.

Under ``flower-supernode`` on a real device the budget is measured instead of sampled
(``experiments/fleet/profile.py``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from experiments.fleet.classes import DEVICE_CLASSES, GIB, DeviceClass
from experiments.schema import FleetConfig

__all__ = [
    "DEVICE_CLASSES",
    "GIB",
    "DeviceBudget",
    "DeviceClass",
    "class_probabilities",
    "is_available",
    "load_factor",
    "sample_budget",
]

# --------------------------------------------------------------------------- stream tags
# Third (or fourth) element of every seed, so the fleet's draws never share a stream with
# each other or with other users of (seed, partition_id) such as cohort sampling.
_BUDGET_STREAM = 0xF1EE7001
_LOAD_STREAM = 0xF1EE7002
_AVAILABILITY_STREAM = 0xF1EE7003


# --------------------------------------------------------------------------- budgets
_NUMERIC_FIELDS = ("memory_bytes", "flops_per_s", "uplink_bps", "downlink_bps", "availability")
_POSITIVE_FIELDS = ("flops_per_s", "uplink_bps", "downlink_bps")  # the clock divides by these


def _is_number(value: Any) -> bool:
    """True for ints and floats (numpy ones too), False for bools and everything else."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


@dataclass(frozen=True)
class DeviceBudget:
    """What one device can spend on a round.

    Attributes
    ----------
    device_class : str
        Its :data:`DEVICE_CLASSES` key, or ``"profiled"`` on a real device.
    memory_bytes : float
        Memory available for training (>= 0).
    flops_per_s : float
        Sustained training speed (> 0).
    uplink_bps, downlink_bps : float
        Link throughput in bytes/s (> 0).
    availability : float
        Probability of answering a round, in [0, 1].
    """

    device_class: str
    memory_bytes: float
    flops_per_s: float
    uplink_bps: float
    downlink_bps: float
    availability: float

    def __post_init__(self) -> None:
        if not isinstance(self.device_class, str) or not self.device_class:
            raise ValueError(f"device_class={self.device_class!r} must be a non-empty string")
        for key in _NUMERIC_FIELDS:
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"budget field {key}={value} must be a finite number >= 0")
        for key in _POSITIVE_FIELDS:
            if getattr(self, key) == 0:
                raise ValueError(f"budget field {key}=0 must be > 0 (the virtual clock divides by it)")
        if self.availability > 1:
            raise ValueError(f"budget field availability={self.availability} must be in [0, 1]")

    def to_record(self, include_class: bool = True) -> dict[str, float | str]:
        """Flat ``{field: value}`` dict for a Flower ``ConfigRecord``.

        Parameters
        ----------
        include_class : bool
            Drop ``device_class`` (the only string) with False, so the dict also fits a
            ``MetricRecord``, which holds numbers only.
        """
        record: dict[str, float | str] = {key: float(getattr(self, key)) for key in _NUMERIC_FIELDS}
        if include_class:
            record["device_class"] = self.device_class
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any], device_class: str | None = None) -> DeviceBudget:
        """Rebuild a budget from :meth:`to_record` output, validating every field.

        Parameters
        ----------
        record : Mapping
            Needs every numeric field and ``device_class`` (unless given as argument).
        device_class : str, optional
            Used when ``record`` has no ``device_class`` (a ``MetricRecord``).

        Raises
        ------
        ValueError
            A field is missing, not a number, negative, or out of range.
        """
        values: dict[str, Any] = {}
        for key in _NUMERIC_FIELDS:
            if key not in record:
                raise ValueError(f"budget record lacks field {key!r}; it needs {list(_NUMERIC_FIELDS)}")
            value = record[key]
            if not _is_number(value):
                raise ValueError(f"budget field {key}={value!r} must be a number")
            values[key] = float(value)
        name = record.get("device_class", device_class)
        if name is None:
            raise ValueError("budget record lacks field 'device_class'; pass device_class= if it was dropped")
        return cls(device_class=name, **values)


def _rng(**keys: int) -> np.random.Generator:
    """Generator seeded by the given non-negative integers, in order."""
    entropy = []
    for key, value in keys.items():
        try:
            number = operator.index(value)
        except TypeError:
            number = -1
        if isinstance(value, bool) or number < 0:
            raise ValueError(f"{key}={value!r} must be a non-negative integer")
        entropy.append(number)
    return np.random.default_rng(entropy)


def class_probabilities(mix: Mapping[str, float]) -> np.ndarray:
    """Probability of each class, in :data:`DEVICE_CLASSES` order, from ``FleetConfig.mix``.

    An empty mix is uniform; otherwise classes not named get weight 0.

    Raises
    ------
    ValueError
        An unknown class name, a negative or non-finite weight, or all weights zero.
    """
    names = list(DEVICE_CLASSES)
    if not mix:
        return np.full(len(names), 1.0 / len(names))
    unknown = sorted(set(mix) - set(names))
    if unknown:
        raise ValueError(f"fleet.mix names unknown device classes {unknown}; valid names: {names}")
    weights = np.zeros(len(names))
    for name, weight in mix.items():
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"fleet.mix[{name!r}]={weight!r} must be a number >= 0") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"fleet.mix[{name!r}]={weight} must be a finite number >= 0")
        weights[names.index(name)] = weight
    if weights.sum() == 0:
        raise ValueError(f"fleet.mix={dict(mix)} has all weights 0; give some class a weight > 0")
    return weights / weights.sum()


def _check_availability(cfg: FleetConfig) -> None:
    if not 0 <= cfg.availability_min <= cfg.availability_max <= 1:
        raise ValueError(
            f"fleet.availability_min={cfg.availability_min}, availability_max={cfg.availability_max}: "
            "need 0 <= availability_min <= availability_max <= 1"
        )


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """Log-uniform draw: link speeds spread over an order of magnitude (assumption)."""
    return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def sample_budget(cfg: FleetConfig, seed: int, partition_id: int) -> DeviceBudget:
    """Draw one device's budget from its class, seeded by ``(seed, partition_id)`` only.

    The class is drawn by ``cfg.mix`` weights (see :func:`class_probabilities`); memory
    (RAM x free share) and FLOP/s uniformly, bandwidths log-uniformly within the class
    ranges; availability uniformly in ``[availability_min, availability_max]``. Cheap, and
    independent of ``cfg.devices`` and of any other device.

    Raises
    ------
    ValueError
        A bad ``cfg.mix`` or availability range, or a negative seed / partition id.
    """
    probabilities = class_probabilities(cfg.mix)
    _check_availability(cfg)
    rng = _rng(seed=seed, partition_id=partition_id, stream=_BUDGET_STREAM)
    device = DEVICE_CLASSES[list(DEVICE_CLASSES)[rng.choice(len(probabilities), p=probabilities)]]
    memory_fraction = rng.uniform(*device.train_memory_fraction)
    flops = rng.uniform(*device.flops_per_s)
    uplink = _log_uniform(rng, device.uplink_bps)
    downlink = _log_uniform(rng, device.downlink_bps)
    availability = rng.uniform(cfg.availability_min, cfg.availability_max)
    return DeviceBudget(
        device_class=device.name,
        memory_bytes=float(device.ram_bytes * memory_fraction),
        flops_per_s=float(flops),
        uplink_bps=uplink,
        downlink_bps=downlink,
        availability=float(availability),
    )


# --------------------------------------------------------------------------- fluctuation
def load_factor(cfg: FleetConfig, seed: int, partition_id: int, round_num: int) -> float:
    """Slow-down from co-running apps in one round (ECLM Fig. 1b: up to ~5x).

    1.0 with probability ``1 - cfg.load_prob``, else uniform in ``(1, cfg.load_max]``;
    seeded by ``(seed, partition_id, round_num)``.

    Raises
    ------
    ValueError
        ``load_prob`` outside [0, 1], ``load_max`` < 1, or a negative seed / id / round.
    """
    if not 0 <= cfg.load_prob <= 1:
        raise ValueError(f"fleet.load_prob={cfg.load_prob} must be in [0, 1]")
    if not cfg.load_max >= 1:
        raise ValueError(f"fleet.load_max={cfg.load_max} must be >= 1 (a slow-down factor)")
    rng = _rng(seed=seed, partition_id=partition_id, round_num=round_num, stream=_LOAD_STREAM)
    if rng.random() >= cfg.load_prob:
        return 1.0
    return 1.0 + (cfg.load_max - 1.0) * (1.0 - rng.random())  # 1 - U[0,1) lies in (0, 1]


def is_available(budget: DeviceBudget, seed: int, partition_id: int, round_num: int) -> bool:
    """Whether the device answers this round: True with probability ``budget.availability``."""
    rng = _rng(seed=seed, partition_id=partition_id, round_num=round_num, stream=_AVAILABILITY_STREAM)
    return bool(rng.random() < budget.availability)
