"""What one round of CEMA's edge batches adds up to: uploads, cloud steps, the teacher's accuracy.

The teacher's accuracy compares the foundation model's classes in each distillation step with
the labels the devices attached to their uploads in the oracle record
(:data:`strategies.protocol.ORACLE_RECORD`, simulation only). :func:`upload_labels` reads them;
the strategy keeps them beside the pending uploads and hands them to
:meth:`RoundTally.add_teacher` only, never to a training step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from strategies.protocol import ORACLE_RECORD, PIXELS_KEY, UPLOADS_RECORD

#: Label of an upload whose label the device did not send (not counted in teacher accuracy).
UNKNOWN_LABEL = -1
#: Entry of the oracle record holding the uploads' labels, in upload order.
UPLOAD_LABELS = "upload_labels"


@dataclass
class RoundTally:
    """What one round's edge batches added up to (the round's CEMA metrics)."""

    uploaded_samples: int = 0
    uploaded_bytes: int = 0
    by_device: dict[str, int] = field(default_factory=dict)
    cloud_steps: int = 0
    replay_steps: int = 0
    teacher_correct: int = 0
    teacher_scored: int = 0

    def add_upload(self, pid: int, reply: Message, pixels: np.ndarray) -> None:
        """Count one reply's uploads (samples and the bytes of their pixel array)."""
        if len(pixels):
            self.uploaded_samples += len(pixels)
            self.uploaded_bytes += len(reply.content[UPLOADS_RECORD][PIXELS_KEY].data)
            self.by_device[str(pid)] = len(pixels)

    def add_teacher(self, predicted: np.ndarray, labels: np.ndarray) -> None:
        """Score the teacher's classes against the labels the devices sent (unknown ones skipped)."""
        known = labels != UNKNOWN_LABEL
        self.teacher_correct += int((predicted[known] == labels[known]).sum())
        self.teacher_scored += int(known.sum())

    def metrics(self) -> dict:
        """``uploaded_*``, ``cloud_steps``, ``replay_steps`` and ``teacher_accuracy`` (None: nothing scored)."""
        return {
            "uploaded_samples": self.uploaded_samples,
            "uploaded_bytes": self.uploaded_bytes,
            "uploaded_samples_by_device": self.by_device,
            "cloud_steps": self.cloud_steps,
            "replay_steps": self.replay_steps,
            "teacher_accuracy": self.teacher_correct / self.teacher_scored if self.teacher_scored else None,
            "teacher_samples": self.teacher_scored,
        }


def upload_labels(reply: Message, count: int) -> np.ndarray:
    """The labels a device sent for its ``count`` uploads, or :data:`UNKNOWN_LABEL` for each."""
    record = reply.content.config_records.get(ORACLE_RECORD)
    if record is None or UPLOAD_LABELS not in record:
        return np.full(count, UNKNOWN_LABEL, dtype=np.int64)
    labels = np.asarray(record[UPLOAD_LABELS], dtype=np.int64)
    return labels if labels.shape == (count,) else np.full(count, UNKNOWN_LABEL, dtype=np.int64)
