"""Injected device faults: a seeded share of devices misbehaves each round.

Each round, every device is faulty with probability ``fraction``; the draw and the kind of
fault come from ``np.random.default_rng([seed, round, partition_id, FAULT_STREAM])``, so
the device itself knows (no coordination, same faults on every rerun). Round 0 (discovery)
is never faulty. A faulty device mishandles the messages whose action is in ``actions``:

``raise``
    the ClientApp raises :class:`InjectedFault`; Flower turns it into an error reply.
``timeout``
    the device answers, but only after ``stall_s`` (the ClientApp passes
    :data:`TIMEOUT_OVERSHOOT` x the cloud's round timeout): the reply comes too late.
``vanish``
    the device's process disappears mid-round (:func:`vanish_process`): ``os._exit`` on a
    real device. Inside a Ray actor (simulation) it stalls forever instead: Flower 1.41's
    ``BasicActorPool`` puts a dead actor back into its pool, so after one ``os._exit`` every
    later message that lands on that actor fails with ``ActorDiedError`` (measured: 1, 2,
    then 3 of 4 devices failed in the rounds after one exit), which would punish healthy
    devices. A stalled actor is one executor lost, as a device gone; the engine's watchdog
    (``experiments/engine/simulation.py``) stops it when the ServerApp has finished.
``wrong_shape``
    the first array of every array record in the reply is flattened and one element short.
``nan_values``
    every float array of the reply becomes NaN, and so does every value of its
    ``metrics`` record (so a reply without float arrays, e.g. uint8 uploads, is corrupted too).

A reply that carries no array cannot get a wrong shape: it is sent unchanged (logged).
(The kind is ``nan_values``, not ``nan``: Hydra's override grammar reads a bare ``nan`` as
a float, so ``faults.kinds=[nan]`` could not name it.)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from clients.base import MalformedMessage, round_of
from experiments.schema import ConfigError, FaultsConfig

logger = logging.getLogger(__name__)

#: What a faulty device can do (module docstring).
FAULT_KINDS = ("raise", "timeout", "vanish", "wrong_shape", "nan_values")
#: Messages a fault can hit (the ClientApp's entry points).
FAULT_ACTIONS = ("train", "evaluate", "query")


def check_faults(faults: FaultsConfig) -> None:
    """``faults.kinds`` and ``faults.actions`` name faults and messages this module injects."""
    unknown_kinds = sorted(set(faults.kinds) - set(FAULT_KINDS))
    if unknown_kinds:
        raise ConfigError(f"faults.kinds must be a non-empty list of {FAULT_KINDS}, got {list(faults.kinds)!r}")
    unknown_actions = sorted(set(faults.actions) - set(FAULT_ACTIONS))
    if unknown_actions:
        raise ConfigError(f"faults.actions must be a non-empty list of {FAULT_ACTIONS}, got {list(faults.actions)!r}")


#: Stream tag that separates fault draws from every other use of the run seed.
FAULT_STREAM = 0xFA
#: A ``timeout`` device replies after this multiple of the cloud's round timeout: the cloud's
#: clock starts when it sends, the device's when it starts, so any factor > 1 is surely late.
TIMEOUT_OVERSHOOT = 1.5
#: Exit status of a vanished device process (EX_TEMPFAIL of BSD sysexits.h: "try again later").
VANISH_EXIT_CODE = 75


class InjectedFault(RuntimeError):
    """What a device with the ``raise`` fault raises (Flower answers the cloud with an error)."""


def fault_for(seed: int, server_round: int, partition_id: int, fraction: float, kinds: Sequence[str]) -> str | None:
    """The fault of device ``partition_id`` in ``server_round`` (None: it behaves).

    ``u ~ U[0, 1)`` from ``default_rng([seed, round, partition_id, FAULT_STREAM])``; the
    device is faulty when ``u < fraction``, and then does ``kinds[k]`` with ``k`` the next
    draw, uniform over ``kinds``. Round 0 (discovery) never has faults.
    """
    if fraction <= 0.0 or server_round < 1:
        return None
    rng = np.random.default_rng([int(seed), int(server_round), int(partition_id), FAULT_STREAM])
    if rng.random() >= fraction:
        return None
    return kinds[int(rng.integers(len(kinds)))]


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (simulation), without importing Ray."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def vanish_process() -> NoReturn:
    """Disappear: exit the process at once; inside a Ray actor, stall forever (module docstring)."""
    if in_ray_worker():
        threading.Event().wait()  # never set: the actor is gone until the engine stops it
    os._exit(VANISH_EXIT_CODE)


def _replace(content: RecordDict, name: str, changed: dict[str, np.ndarray]) -> None:
    """Array record ``name`` with the ``changed`` arrays swapped in, every other array kept as sent."""
    record = content.array_records[name]
    content[name] = ArrayRecord({key: Array(changed[key]) if key in changed else arr for key, arr in record.items()})


def corrupt_shapes(content: RecordDict) -> list[str]:
    """Flatten the first array of every array record, one element short; returns what changed."""
    changed = []
    for name, record in list(content.array_records.items()):
        if not len(record):
            continue
        key = next(iter(record.keys()))
        flat = record[key].numpy().reshape(-1)
        _replace(content, name, {key: flat[:-1].copy() if flat.size else np.zeros(1, dtype=flat.dtype)})
        changed.append(f"{name}/{key}")
    return changed


def corrupt_values(content: RecordDict) -> list[str]:
    """NaN in every float array and every ``metrics`` value; returns what changed."""
    changed = []
    for name, record in list(content.array_records.items()):
        arrays = {key: arr.numpy() for key, arr in record.items()}
        nans = {key: np.full_like(v, np.nan) for key, v in arrays.items() if np.issubdtype(v.dtype, np.floating)}
        if nans:
            _replace(content, name, nans)
            changed += [f"{name}/{key}" for key in nans]
    metrics = content.metric_records.get("metrics")
    if metrics is not None and len(metrics):
        nan = float("nan")
        content["metrics"] = MetricRecord(
            {k: [nan] * len(v) if isinstance(v, list) else nan for k, v in metrics.items()}
        )
        changed.append("metrics")
    return changed


@dataclass(frozen=True)
class FaultInjector:
    """Wraps a device's message handling with its injected fault of the round.

    Parameters
    ----------
    fraction : float
        Chance that a device misbehaves in a round, in [0, 1]; 0 switches faults off.
    kinds : sequence of str
        Faults a faulty device draws from (:data:`FAULT_KINDS`), uniformly.
    actions : sequence of str
        Messages a faulty device mishandles (:data:`FAULT_ACTIONS`).
    seed : int
        The run's seed (>= 0).
    stall_s : float
        How long a ``timeout`` device holds its reply (seconds, >= 0).
    vanish : callable
        How a ``vanish`` device disappears; never returns (default :func:`vanish_process`).
    """

    fraction: float
    kinds: tuple[str, ...]
    actions: tuple[str, ...]
    seed: int
    stall_s: float
    vanish: Callable[[], NoReturn] = field(default=vanish_process, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fault fraction must be in [0, 1], got {self.fraction!r}")
        if not self.kinds or not set(self.kinds) <= set(FAULT_KINDS):
            raise ValueError(f"fault kinds must be a non-empty list of {FAULT_KINDS}, got {self.kinds!r}")
        if not self.actions or not set(self.actions) <= set(FAULT_ACTIONS):
            raise ValueError(f"fault actions must be a non-empty list of {FAULT_ACTIONS}, got {self.actions!r}")
        if self.seed < 0 or self.stall_s < 0:
            raise ValueError(f"seed and stall_s must be >= 0, got {self.seed!r} and {self.stall_s!r}")

    def fault_of(self, action: str, msg: Message, partition_id: int) -> str | None:
        """The fault this message meets (None for healthy devices, other actions, unreadable rounds)."""
        if self.fraction <= 0.0 or action not in self.actions:
            return None
        try:
            server_round = round_of(msg)
        except MalformedMessage:
            return None  # the handler answers it as malformed
        return fault_for(self.seed, server_round, partition_id, self.fraction, self.kinds)

    def handle(self, action: str, msg: Message, partition_id: int, respond: Callable[[], Message]) -> Message:
        """``respond()`` (the device's handler) with this round's fault applied, if any."""
        kind = self.fault_of(action, msg, partition_id)
        if kind is None:
            return respond()
        where = f"device {partition_id}, {action}, round {round_of(msg)}"
        logger.warning("injected fault %s (%s)", kind, where)
        if kind == "raise":
            raise InjectedFault(f"injected fault: raise ({where})")
        if kind == "vanish":
            self.vanish()
        reply = respond()
        if kind == "timeout":
            time.sleep(self.stall_s)
        elif reply.has_content():
            changed = corrupt_shapes(reply.content) if kind == "wrong_shape" else corrupt_values(reply.content)
            if not changed:
                logger.warning("injected fault %s left the reply unchanged: it holds nothing to corrupt (%s)", kind, where)
        return reply
