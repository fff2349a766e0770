"""What every online (test-time) edge handler shares: stream position, persisted state, replies.

A device processes the next batch of its own stream each round: it predicts first (that
prediction is what online accuracy counts), then adapts. Its position and whatever its
method must remember (model, optimizer, thresholds) live in Flower's ``context.state``.
``context.state`` does not survive a restart of the simulation, so when the device has a
``state_store`` it also saves that record after each round (:func:`persist_progress`) and a
resumed run reloads it on the device's first message (:func:`restore_progress`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from clients.base import Device, MalformedMessage, StreamTensors, content_reply

#: Name of the device's online state in ``context.state``.
STATE_KEY = "online"


def next_batch(device: Device, context: Context) -> StreamTensors:
    """The device's next unseen batch (its stream position is kept in ``context.state``)."""
    if device.stream is None:
        raise MalformedMessage("this device has no online stream (use an online scenario)")
    return device.stream(stream_index(context))


def stream_index(context: Context) -> int:
    """How many batches this device has processed so far."""
    record = context.state.config_records.get(STATE_KEY)
    return 0 if record is None else int(record["index"])


def load_blob(context: Context) -> dict[str, Any] | None:
    """The method state saved after the previous batch (None on the first one)."""
    record = context.state.config_records.get(STATE_KEY)
    if record is None or "blob" not in record:
        return None
    return torch.load(io.BytesIO(record["blob"]), weights_only=False)


def save_progress(context: Context, index: int, state: Mapping[str, Any] | None) -> None:
    """Remember the next batch index and the method's state (serialised to bytes)."""
    values: dict[str, Any] = {"index": int(index)}
    if state is not None:
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        values["blob"] = buffer.getvalue()
    context.state[STATE_KEY] = ConfigRecord(values)


def restore_progress(device: Device, context: Context, server_round: int) -> None:
    """After a restart (no record in ``context.state``): reload what the device saved before ``server_round``."""
    if device.state_store is None or STATE_KEY in context.state.config_records:
        return
    saved = device.state_store.load_before(server_round)
    if saved is None:
        return
    index, blob = saved
    values: dict[str, Any] = {"index": int(index)}
    if blob is not None:
        values["blob"] = blob
    context.state[STATE_KEY] = ConfigRecord(values)


def persist_progress(device: Device, context: Context, server_round: int) -> None:
    """Save the device's ``context.state`` record after ``server_round`` to its store (if it has one)."""
    record = context.state.config_records.get(STATE_KEY)
    if device.state_store is None or record is None:
        return
    blob = record["blob"] if "blob" in record else None
    device.state_store.save(server_round, int(record["index"]), blob)


def batch_reply(
    msg: Message,
    batch: StreamTensors,
    logits: torch.Tensor,
    metrics: Mapping[str, float | int],
    uploads: np.ndarray | None = None,
) -> Message:
    """Online accuracy of the prediction made before adaptation, the batch's domain, uploads.

    ``uploads`` (uint8 pixels) travel as an array record, so their bytes are counted.
    """
    correct = int((logits.argmax(dim=1) == batch.y).sum())
    values = {
        "num_examples": len(batch.y),
        "correct": correct,
        "accuracy": correct / max(len(batch.y), 1),
        "uploads": 0 if uploads is None else int(len(uploads)),
        **metrics,
    }
    configs = {"stream": ConfigRecord({"domain": batch.domain, "index": batch.index})}
    reply = content_reply(msg, values, configs=configs)
    if uploads is not None and len(uploads):
        reply.content["uploads"] = ArrayRecord({"pixels": Array(np.ascontiguousarray(uploads))})
    return reply
