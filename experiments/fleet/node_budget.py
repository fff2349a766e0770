"""A device's budget from its SuperNode's ``--node-config``: declared, profiled or sampled.

Flower's simulation gives every node the config ``{partition-id, num-partitions}`` and
nothing else, which a real SuperNode can give too; so the source of the budget is said
explicitly by the node config (``docs/DEPLOY.md``):

``budget="sampled"`` (the default when no budget key is given)
    The simulator's budget: drawn from the device-class table by (seed, partition id),
    with simulated co-running load and unavailability (``experiments/fleet/budgets.py``).
``budget="given"`` (the default when any budget key is given)
    A budget measured beforehand: ``memory-bytes``, ``flops-per-s``, ``uplink-bps`` and
    ``downlink-bps`` are all required; ``device-class`` and ``availability`` optional.
``budget="profile"``
    Measured on the device at its first message (``experiments/fleet/profile.py``: the kernel's
    available memory and a short matmul benchmark); ``memory-bytes``/``flops-per-s`` given
    alongside replace the measurement; ``uplink-bps`` and ``downlink-bps`` are required,
    since measuring a link needs a peer (measure it with e.g. ``iperf3 -c <cloud host>``).

A declared or profiled budget belongs to a real device: it is not slowed by simulated
load nor made to skip rounds (its real load and outages show on their own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context

from experiments.fleet.budgets import DeviceBudget
from experiments.fleet.node_memory import BUDGET_RECORD, remembered
from experiments.fleet.profile import profile_local_budget

#: Node-config key that names the budget's source.
BUDGET_MODE_KEY = "budget"
SAMPLED, GIVEN, PROFILE = "sampled", "given", "profile"
BUDGET_MODES = (SAMPLED, GIVEN, PROFILE)
#: Node-config keys (Flower's kebab-case, like ``partition-id``) -> DeviceBudget fields.
MEASURED_KEYS = {"memory-bytes": "memory_bytes", "flops-per-s": "flops_per_s"}
LINK_KEYS = {"uplink-bps": "uplink_bps", "downlink-bps": "downlink_bps"}
CLASS_KEY = "device-class"
AVAILABILITY_KEY = "availability"
BUDGET_KEYS = (*MEASURED_KEYS, *LINK_KEYS, CLASS_KEY, AVAILABILITY_KEY)
#: ``device_class`` of a budget declared in the node config without a name.
DECLARED_CLASS = "declared"
#: Availability of a real device: it answers when it can (outages are real, not drawn).
REAL_DEVICE_AVAILABILITY = 1.0

Profiler = Callable[..., DeviceBudget]


def budget_mode(node_config: Mapping[str, Any]) -> str:
    """Where the device's budget comes from: ``"sampled"``, ``"given"`` or ``"profile"``.

    Raises
    ------
    ValueError
        An unknown ``budget`` value, or budget keys with ``budget="sampled"``.
    """
    given_keys = sorted(k for k in BUDGET_KEYS if k in node_config)
    mode = node_config.get(BUDGET_MODE_KEY, GIVEN if given_keys else SAMPLED)
    if mode not in BUDGET_MODES:
        raise ValueError(
            f"node config budget={mode!r} is unknown; use one of {list(BUDGET_MODES)} "
            "(e.g. --node-config 'partition-id=0 budget=\"profile\" uplink-bps=1e6 downlink-bps=5e6')"
        )
    if mode == SAMPLED and given_keys:
        raise ValueError(
            f"node config sets budget=\"sampled\" and also {given_keys}; drop one: sampled budgets "
            "come from the device-class table"
        )
    return mode


def _number(node_config: Mapping[str, Any], key: str) -> float:
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"node config {key}={value!r} must be a finite number (e.g. {key}=1.5e6)")
    return float(value)


def _required(node_config: Mapping[str, Any], keys: Mapping[str, str], mode: str) -> dict[str, float]:
    missing = [k for k in keys if k not in node_config]
    if missing:
        raise ValueError(
            f"node config with budget={mode!r} lacks {missing}; add them to --node-config, "
            f"e.g. '{' '.join(f'{k}=1e6' for k in missing)}' (bytes/s for links, FLOP/s, bytes)"
        )
    return {field: _number(node_config, key) for key, field in keys.items()}


def _declared_fields(node_config: Mapping[str, Any]) -> dict[str, Any]:
    name = node_config.get(CLASS_KEY, DECLARED_CLASS)
    if not isinstance(name, str) or not name:
        raise ValueError(f"node config {CLASS_KEY}={name!r} must be a non-empty string")
    availability = (
        _number(node_config, AVAILABILITY_KEY) if AVAILABILITY_KEY in node_config else REAL_DEVICE_AVAILABILITY
    )
    return {"device_class": name, "availability": availability}


def local_budget(node_config: Mapping[str, Any], profiler: Profiler = profile_local_budget) -> DeviceBudget | None:
    """The budget a real device declares or measures; None when it is to be sampled.

    Parameters
    ----------
    node_config : Mapping
        The SuperNode's ``--node-config`` (``context.node_config``).
    profiler : callable
        ``profiler(uplink_bps, downlink_bps) -> DeviceBudget`` for ``budget="profile"``.

    Raises
    ------
    ValueError
        A bad mode, a missing or non-numeric key, or a budget out of range.
    """
    mode = budget_mode(node_config)
    if mode == SAMPLED:
        return None
    links = _required(node_config, LINK_KEYS, mode)
    fields = _declared_fields(node_config)
    if mode == GIVEN:
        return DeviceBudget(**_required(node_config, MEASURED_KEYS, mode), **links, **fields)
    measured = profiler(links["uplink_bps"], links["downlink_bps"], availability=fields["availability"])
    overrides = {field: _number(node_config, key) for key, field in MEASURED_KEYS.items() if key in node_config}
    name = node_config.get(CLASS_KEY, measured.device_class)
    return DeviceBudget(**{**measured.to_record(), **overrides, "device_class": name})


def device_budget(context: Context) -> DeviceBudget | None:
    """The message's device budget from its node config; None when it is to be sampled.

    A profiled budget is measured at the node's first message and kept in
    ``context.state`` (:data:`experiments.fleet.node_memory.BUDGET_RECORD`), so every round sees
    the same figures the device reported at discovery.
    """
    node_config = context.node_config
    if budget_mode(node_config) != PROFILE:
        return local_budget(node_config)
    record = remembered(context, BUDGET_RECORD, lambda: local_budget(node_config).to_record())
    return DeviceBudget.from_record(record)
