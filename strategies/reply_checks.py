"""Checks of a device's reply against what the cloud sent it: no NaN reaches aggregation.

:meth:`strategies.base.EdgeCloudStrategy.exchange` runs :func:`reply_problem` on every
reply with content; a reply with a problem is counted as a failure ``"rejected: <problem>"``
and never reaches ``aggregate_*``. The rules are generic, so they hold for every algorithm:

* an array record the cloud sent under the same name (the model, a sub-model, a selector)
  is the reference: the reply's keys must be among the sent keys (ECLM devices may drop
  modules, HeteroFL's sBN query returns BN statistics only), with the sent dtype and shape;
* an array record the cloud never sends must have a known :class:`ArraySpec` (``uploads``:
  uint8 images (k, H, W, C));
* float arrays hold no NaN or inf;
* the ``metrics`` entries the cloud computes with (:data:`COUNTED_METRICS`) are finite and
  >= 0. Other metrics may be NaN: that means "no value" (e.g. the loss of zero local
  epochs) and weighted means skip it (``strategies.aggregate.weighted_metric``).

Each problem starts with a short category (``nan``, ``wrong shape``, ``wrong dtype``,
``unknown key``, ``unexpected record``, ``bad metric``, ``unreadable``), then the detail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from strategies.protocol import (
    COMPUTE_TIME_KEY,
    CORRECT_KEY,
    METRICS_RECORD,
    SAMPLES_TRAINED_KEY,
    TEST_EXAMPLES_KEY,
    TRAIN_EXAMPLES_KEY,
    UPLOAD_COUNT_KEY,
    UPLOADS_RECORD,
    WEIGHT_KEY,
)


@dataclass(frozen=True)
class ArraySpec:
    """What every array of a record the cloud never sends must be.

    Parameters
    ----------
    dtype : str
        NumPy dtype name, e.g. ``"uint8"``.
    ndim : int
        Number of dimensions.
    """

    dtype: str
    ndim: int


#: Records devices send that the cloud never sends: raw uint8 images (k, H, W, C) uploaded
#: by online devices (``clients/online.py``, ``OnlineClient.batch_reply``; CEMA's uploads, seed 000).
UNSENT_RECORDS: Mapping[str, ArraySpec] = {UPLOADS_RECORD: ArraySpec(dtype="uint8", ndim=4)}
#: ``metrics`` entries the cloud computes with: weights (FedAvg eq. 1), virtual time, online
#: tallies. Each must be a finite number >= 0 when present.
COUNTED_METRICS = (
    WEIGHT_KEY,
    TRAIN_EXAMPLES_KEY,
    TEST_EXAMPLES_KEY,
    SAMPLES_TRAINED_KEY,
    COMPUTE_TIME_KEY,
    CORRECT_KEY,
    UPLOAD_COUNT_KEY,
)


def reply_problem(
    reply: RecordDict,
    sent: RecordDict,
    unsent: Mapping[str, ArraySpec] = UNSENT_RECORDS,
) -> str | None:
    """Why the content of a reply must not be used (None if it may).

    Parameters
    ----------
    reply : RecordDict
        The reply's content.
    sent : RecordDict
        The content of the message the cloud sent that device.
    unsent : mapping of str to ArraySpec
        Array records a reply may carry although the cloud sent none of that name.
    """
    for name, record in reply.array_records.items():
        reference = sent.array_records.get(name)
        if reference is not None:
            problem = sent_record_problem(name, record, reference)
        elif name in unsent:
            problem = spec_problem(name, record, unsent[name])
        else:
            problem = f"unexpected record: array record {name!r} was not sent and is no known upload"
        if problem is not None:
            return problem
    metrics = reply.metric_records.get(METRICS_RECORD)
    return None if metrics is None else metrics_problem(metrics)


def sent_record_problem(name: str, record: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Keys among the sent ones, with the sent dtype and shape, finite values."""
    for key, arr in record.items():
        where = f"{name}/{key}"
        if key not in reference:
            return f"unknown key: {where} was not sent"
        ref = reference[key]
        if arr.dtype != ref.dtype:
            return f"wrong dtype: {where} is {arr.dtype}, sent {ref.dtype}"
        if tuple(arr.shape) != tuple(ref.shape):
            return f"wrong shape: {where} is {tuple(arr.shape)}, sent {tuple(ref.shape)}"
    return finite_problem(name, record)


def spec_problem(name: str, record: ArrayRecord, spec: ArraySpec) -> str | None:
    """Every array of the dtype and number of dimensions ``spec`` asks for, finite values."""
    for key, arr in record.items():
        where = f"{name}/{key}"
        if arr.dtype != spec.dtype:
            return f"wrong dtype: {where} is {arr.dtype}, expected {spec.dtype}"
        if len(arr.shape) != spec.ndim:
            return f"wrong shape: {where} is {tuple(arr.shape)}, expected {spec.ndim} dimensions"
    return finite_problem(name, record)


def finite_problem(name: str, record: ArrayRecord) -> str | None:
    """The first float array of ``record`` holding NaN or inf, or an undecodable array."""
    for key, arr in record.items():
        try:
            values = arr.numpy()
        except (ValueError, TypeError) as exc:
            return f"unreadable: {name}/{key}: {exc}"
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"nan: {name}/{key} holds NaN or inf"
    return None


def metrics_problem(metrics: MetricRecord) -> str | None:
    """A counted metric (:data:`COUNTED_METRICS`) that is not a finite number >= 0."""
    for key in COUNTED_METRICS:
        if key not in metrics:
            continue
        values = metrics[key] if isinstance(metrics[key], list) else [metrics[key]]
        for value in values:
            if not math.isfinite(value):
                return f"nan: metrics/{key} is {value}"
            if value < 0:
                return f"bad metric: metrics/{key} is {value}, must be >= 0"
    return None
