"""The base of every online (test-time) edge handler: stream position, kept state, replies.

A device processes the next batch of its own stream each round: it predicts first (that
prediction is what online accuracy counts), then adapts. Its position and whatever its
method must remember (model, optimizer, thresholds) live in Flower's ``context.state``.
``context.state`` does not survive a restart of the simulation, so when the device has a
``state_store`` it also saves that record after each round
(:meth:`OnlineClient.keep_progress`) and a resumed run reloads it on the device's first
message (:meth:`OnlineClient.restore_progress`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from clients.base import ClientHandler, MalformedMessage, StreamTensors, content_reply
from clients.protocol import (
    ACCURACY_KEY,
    CORRECT_KEY,
    DOMAIN_KEY,
    INDEX_KEY,
    PIXELS_KEY,
    STREAM_RECORD,
    UPLOAD_COUNT_KEY,
    UPLOADS_RECORD,
    WEIGHT_KEY,
)

#: Name of the device's online state in ``context.state``.
STATE_KEY = "online"
#: Entries of that state: the next batch's index and the method's serialised state.
INDEX_ENTRY = "index"
BLOB_ENTRY = "blob"


class OnlineClient(ClientHandler):
    """What the online handlers (CEMA's edge, the TTA baselines, ElasticDNN) share.

    A subclass's ``train`` calls :meth:`restore_progress`, reads its batch
    (:meth:`next_batch`, or ``device.stream`` at :meth:`stream_index`), restores its
    method's state (:meth:`load_blob`), predicts and adapts, then calls
    :meth:`keep_progress` and answers with :meth:`batch_reply`.
    """

    # ---------------------------------------------------------------- the stream
    def next_batch(self, context: Context) -> StreamTensors:
        """The device's next unseen batch (its stream position is kept in ``context.state``)."""
        if self.device.stream is None:
            raise MalformedMessage("this device has no online stream (use an online scenario)")
        return self.device.stream(self.stream_index(context))

    @staticmethod
    def stream_index(context: Context) -> int:
        """How many batches this device has processed so far."""
        record = context.state.config_records.get(STATE_KEY)
        return 0 if record is None else int(record[INDEX_ENTRY])

    # ---------------------------------------------------------------- kept state
    @staticmethod
    def load_blob(context: Context) -> dict[str, Any] | None:
        """The method state saved after the previous batch (None on the first one)."""
        record = context.state.config_records.get(STATE_KEY)
        if record is None or BLOB_ENTRY not in record:
            return None
        return torch.load(io.BytesIO(record[BLOB_ENTRY]), weights_only=False)

    def keep_progress(self, context: Context, server_round: int, index: int, state: Mapping[str, Any] | None) -> None:
        """Remember the next batch ``index`` and the method's ``state`` in ``context.state``, and in
        the device's ``state_store`` (if it has one) as of ``server_round``."""
        values: dict[str, Any] = {INDEX_ENTRY: int(index)}
        if state is not None:
            buffer = io.BytesIO()
            torch.save(dict(state), buffer)
            values[BLOB_ENTRY] = buffer.getvalue()
        context.state[STATE_KEY] = ConfigRecord(values)
        if self.device.state_store is not None:
            self.device.state_store.save(server_round, int(index), values.get(BLOB_ENTRY))

    def restore_progress(self, context: Context, server_round: int) -> None:
        """After a restart (no record in ``context.state``): reload what the device saved before ``server_round``."""
        if self.device.state_store is None or STATE_KEY in context.state.config_records:
            return
        saved = self.device.state_store.load_before(server_round)
        if saved is None:
            return
        index, blob = saved
        values: dict[str, Any] = {INDEX_ENTRY: int(index)}
        if blob is not None:
            values[BLOB_ENTRY] = blob
        context.state[STATE_KEY] = ConfigRecord(values)

    # ---------------------------------------------------------------- the reply
    @staticmethod
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
            WEIGHT_KEY: len(batch.y),
            CORRECT_KEY: correct,
            ACCURACY_KEY: correct / max(len(batch.y), 1),
            UPLOAD_COUNT_KEY: 0 if uploads is None else int(len(uploads)),
            **metrics,
        }
        configs = {STREAM_RECORD: ConfigRecord({DOMAIN_KEY: batch.domain, INDEX_KEY: batch.index})}
        reply = content_reply(msg, values, configs=configs)
        if uploads is not None and len(uploads):
            reply.content[UPLOADS_RECORD] = ArrayRecord({PIXELS_KEY: Array(np.ascontiguousarray(uploads))})
        return reply
