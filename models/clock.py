"""The virtual clock: how long a device's round takes from its FLOPs, bytes and budget.

Pure arithmetic on numbers a device reports, so the edge (its compute time) and the
cloud (its communication time, the round's time) use the same formulas without either
reading the fleet table (ECLM 2.1, 7.1: latency = compute + communication; a synchronous
round lasts as long as its slowest participant).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping


def _check_amount(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value} must be a finite number >= 0")


def _check_rate(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} must be a finite number > 0")


def compute_time_s(train_flops: float, flops_per_s: float, load: float = 1.0) -> float:
    """Virtual training time ``train_flops / flops_per_s * load`` in seconds.

    ``load`` >= 1 is the slow-down from co-running apps (ECLM Fig. 1b).
    """
    _check_amount("train_flops", train_flops)
    _check_rate("flops_per_s", flops_per_s)
    if not (math.isfinite(load) and load >= 1):
        raise ValueError(f"load={load} must be a finite slow-down factor >= 1")
    return train_flops / flops_per_s * load


def comm_time_s(uplink_bytes: float, downlink_bytes: float, uplink_bps: float, downlink_bps: float) -> float:
    """Virtual transfer time ``uplink_bytes / uplink_bps + downlink_bytes / downlink_bps``."""
    _check_amount("uplink_bytes", uplink_bytes)
    _check_amount("downlink_bytes", downlink_bytes)
    _check_rate("uplink_bps", uplink_bps)
    _check_rate("downlink_bps", downlink_bps)
    return uplink_bytes / uplink_bps + downlink_bytes / downlink_bps


def round_time_s(
    device_times: Mapping[Hashable, float], deadline_s: float | None = None
) -> tuple[float, list[Hashable]]:
    """A round lasts as long as its slowest kept device.

    Returns ``(round time, dropped keys in input order)``: the max over kept devices,
    the deadline if every device was dropped, 0.0 for no devices. ``deadline_s`` None
    keeps every device.
    """
    if deadline_s is not None and not (math.isfinite(deadline_s) and deadline_s > 0):
        raise ValueError(f"deadline_s={deadline_s} must be a finite number > 0, or None for no deadline")
    for key, seconds in device_times.items():
        _check_amount(f"device_times[{key!r}]", seconds)
    if deadline_s is None:
        return max(device_times.values(), default=0.0), []
    dropped = [key for key, seconds in device_times.items() if seconds > deadline_s]
    kept = [seconds for seconds in device_times.values() if seconds <= deadline_s]
    if not kept:
        return (float(deadline_s) if dropped else 0.0), dropped
    return max(kept), dropped
