"""What every edge handler shares: the device it runs on, replies, errors, timing.

A handler receives everything from the ClientApp (``experiments/client_app.py``): the
device's data, budget and model factory arrive in a :class:`Device`; the handler never
reads the fleet table or the run config, so the same handler runs on a simulated or a
real device.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from torch import nn

from clients.protocol import (
    ACCURACY_KEY,
    ARRAYS_RECORD,
    BUDGET_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    PARTITION_KEY,
    ROUND_KEY,
    WALL_TIME_KEY,
    WEIGHT_KEY,
)
from models.clock import compute_time_s
from models.training import TrainSettings, accuracy

logger = logging.getLogger(__name__)

#: Error code of a reply from a device that does not take part (unavailable, over budget).
DEVICE_DECLINED = 100
#: Error code of a reply to a message the device cannot read.
MALFORMED_MESSAGE = 101
#: Error code of a reply from a handler that failed on a readable message (a device-side error).
HANDLER_FAILED = 102
#: The ClientApp entry points a handler answers (Flower's message types).
HANDLED_ACTIONS = ("train", "evaluate", "query")


@dataclass(frozen=True)
class DeviceTensors:
    """A device's local data for one time slot, ready for the model."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass(frozen=True)
class StreamTensors:
    """One batch of a device's online (test-time) stream.

    ``x`` is ready for the model; ``pixels`` are the raw uint8 images (N, H, W, C), what
    a device uploads; ``y`` is known to the simulator only, for online accuracy.
    """

    x: torch.Tensor
    y: torch.Tensor
    pixels: np.ndarray
    domain: str
    index: int


class ProgressStore(Protocol):
    """Durable copy of an online device's progress (the ClientApp provides one; see ``experiments/resume/device_state.py``)."""

    def save(self, server_round: int, index: int, blob: bytes | None) -> None:
        """Keep the stream ``index`` and the method's serialised state after ``server_round``."""

    def load_before(self, server_round: int) -> tuple[int, bytes | None] | None:
        """``(index, blob)`` saved after the newest earlier round, or None."""


@dataclass(frozen=True)
class Device:
    """Everything an edge handler may use about the device it runs on.

    Parameters
    ----------
    partition_id : int
        The device's index in the fleet (its data partition).
    seed : int
        The run's seed; handlers derive their own seeds from it.
    budget : Mapping[str, float | str]
        The device's resource budget as it reports it to the cloud (ECLM's local
        profiler): at least ``flops_per_s``, ``memory_bytes``, ``uplink_bps``,
        ``downlink_bps``.
    data : Callable[[int], DeviceTensors]
        Local data for a time slot.
    num_examples : Callable[[int], int]
        Training-set size in a time slot, without rendering the data.
    build_model : Callable[[], nn.Module]
        A fresh instance of the run's network.
    train : TrainSettings
        Local training settings.
    flops_per_sample : float
        Training FLOPs per sample of the run's network (measured by torch).
    load_factor : Callable[[int], float]
        Slow-down from co-running apps in a round (>= 1).
    is_available : Callable[[int], bool]
        Whether the device answers in a round.
    slot_of_round : Callable[[int], int]
        The data time slot a round falls in.
    options : Mapping[str, Any]
        The algorithm's own settings (e.g. ECLM's load-balancing weight).
    stream : Callable[[int], StreamTensors] or None
        Batch ``index`` of the device's online stream (test-time adaptation scenarios).
    state_store : ProgressStore or None
        Where an online device also saves the state it keeps in ``context.state``, so a
        resumed run can reload it after a restart (:class:`clients.online.OnlineClient`); None:
        not saved.
    """

    partition_id: int
    seed: int
    budget: Mapping[str, float | str]
    data: Callable[[int], DeviceTensors]
    num_examples: Callable[[int], int]
    build_model: Callable[[], nn.Module]
    train: TrainSettings
    flops_per_sample: float
    load_factor: Callable[[int], float]
    is_available: Callable[[int], bool]
    slot_of_round: Callable[[int], int]
    options: Mapping[str, Any] = field(default_factory=dict)
    stream: Callable[[int], StreamTensors] | None = None
    state_store: ProgressStore | None = None


class MalformedMessage(ValueError):
    """A message whose content the handler cannot use."""


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integer parts (stable across processes and platforms)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def round_of(msg: Message) -> int:
    """The server round a message belongs to (its ``config`` record's ``round``)."""
    config = msg.content.config_records.get(CONFIG_RECORD)
    if config is None or ROUND_KEY not in config:
        raise MalformedMessage(f"message has no config record with a {ROUND_KEY!r} entry")
    value = config[ROUND_KEY]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedMessage(f"config {ROUND_KEY!r} must be a non-negative int, got {value!r}")
    return value


def check_arrays(msg: Message) -> None:
    """Every array record of ``msg`` is readable and its float arrays are finite.

    Raises
    ------
    MalformedMessage
        An array that cannot be decoded, or NaN/inf in a float array.
    """
    for name, record in msg.content.array_records.items():
        for key, arr in record.items():
            try:
                values = arr.numpy()
            except (ValueError, TypeError) as exc:
                raise MalformedMessage(f"array {name}/{key} cannot be read: {exc}") from exc
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                raise MalformedMessage(f"array {name}/{key} holds NaN or inf values")


def model_from(msg: Message, device: Device, key: str = ARRAYS_RECORD) -> nn.Module:
    """The network of ``device`` loaded with the message's arrays under ``key``.

    Keys, shapes and dtypes must be the model's own (torch would silently cast dtypes).
    """
    return load_arrays(device.build_model(), msg, key)


def load_arrays(model: nn.Module, msg: Message, key: str) -> nn.Module:
    """Load the message's array record ``key`` into ``model`` (strict keys, shapes and dtypes).

    Raises
    ------
    MalformedMessage
        The record is missing or does not fit ``model``.
    """
    arrays = msg.content.array_records.get(key)
    if arrays is None:
        raise MalformedMessage(f"message has no array record {key!r}")
    try:
        state = arrays.to_torch_state_dict()
        own = model.state_dict()
        wrong = sorted(k for k, v in state.items() if k in own and v.dtype != own[k].dtype)
        if wrong:
            raise ValueError(f"{wrong[0]} is {state[wrong[0]].dtype}, the model's is {own[wrong[0]].dtype}")
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise MalformedMessage(f"arrays {key!r} do not fit the device's model: {exc}") from exc
    return model


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """A reply that carries an error instead of content (counted as a failure by the cloud)."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


def content_reply(
    msg: Message,
    metrics: Mapping[str, float | int],
    arrays: ArrayRecord | None = None,
    configs: Mapping[str, ConfigRecord] | None = None,
) -> Message:
    """A reply with a ``metrics`` record, optional ``arrays`` and extra config records.

    The shape Flower's own strategies aggregate: one MetricRecord (weighted by its
    ``num-examples``) and at most one ArrayRecord besides records of other kinds.
    """
    content = RecordDict({METRICS_RECORD: MetricRecord(dict(metrics))})
    if arrays is not None:
        content[ARRAYS_RECORD] = arrays
    for name, record in (configs or {}).items():
        content[name] = record
    return Message(content=content, reply_to=msg)


class ClientHandler:
    """Base edge handler: budget query and evaluation; subclasses add ``train``.

    Parameters
    ----------
    device : Device
        The device this handler runs on.
    """

    def __init__(self, device: Device) -> None:
        self.device = device

    # ---------------------------------------------------------------- entry points
    def query(self, msg: Message, context: Context) -> Message:
        """Report who the device is and its budget (one-time discovery, ECLM's profiler)."""
        metrics = {PARTITION_KEY: self.device.partition_id, WEIGHT_KEY: self.device.num_examples(0)}
        budget = ConfigRecord(dict(self.device.budget))
        return content_reply(msg, metrics, configs={BUDGET_RECORD: budget})

    def train(self, msg: Message, context: Context) -> Message:
        """Train on local data; algorithms override this."""
        raise MalformedMessage(f"{type(self).__name__} does not train")

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Accuracy of the received model on the device's held-out local test data."""
        server_round = round_of(msg)
        model = model_from(msg, self.device)
        data = self.device.data(self.device.slot_of_round(server_round))
        metrics = {
            WEIGHT_KEY: len(data.test_y),
            ACCURACY_KEY: accuracy(model, data.test_x, data.test_y),
            PARTITION_KEY: self.device.partition_id,
        }
        return content_reply(msg, metrics)

    # ---------------------------------------------------------------- helpers
    def compute_time_s(self, samples_trained: int, server_round: int) -> float:
        """Virtual compute time: FLOPs of the samples trained / device speed x load."""
        flops = self.device.flops_per_sample * samples_trained
        return compute_time_s(flops, float(self.device.budget["flops_per_s"]), self.device.load_factor(server_round))

    def handle(self, action: str, msg: Message, context: Context) -> Message:
        """Dispatch ``action`` with checks and error replies; never raises (an ``Exception``).

        The message is checked first (a known action, a ``config`` record with the round
        except for queries, readable and finite arrays); a message the handler cannot use
        gets a :data:`MALFORMED_MESSAGE` reply, an unavailable device :data:`DEVICE_DECLINED`,
        and any other error of the handler a :data:`HANDLER_FAILED` reply naming it.
        """
        try:
            if action not in HANDLED_ACTIONS:
                raise MalformedMessage(f"unknown action {action!r}; a device answers {HANDLED_ACTIONS}")
            if action != "query":
                server_round = round_of(msg)
                if not self.device.is_available(server_round):
                    return error_reply(msg, DEVICE_DECLINED, "unavailable this round")
            check_arrays(msg)
            started = time.perf_counter()
            reply = getattr(self, action)(msg, context)
            if reply.has_content():
                reply.content[METRICS_RECORD][WALL_TIME_KEY] = time.perf_counter() - started
            return reply
        except MalformedMessage as exc:
            return error_reply(msg, MALFORMED_MESSAGE, f"malformed message: {exc}")
        except Exception as exc:  # a device error must reach the cloud as a reply, not stop the node
            logger.warning("device %s failed on %s:\n%s", self.device.partition_id, action, traceback.format_exc())
            return error_reply(msg, HANDLER_FAILED, f"handler failed: {type(exc).__name__}: {exc}")
