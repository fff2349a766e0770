"""Pure aggregation helpers shared by strategies (no Flower grid, no state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord


def weighted_average(records: Sequence[ArrayRecord], weights: Sequence[float]) -> ArrayRecord:
    """Element-wise weighted mean of array records with the same keys (FedAvg, McMahan 2017 eq. 1).

    ``w = sum_k (n_k / sum_j n_j) * w_k``. Float arrays are averaged in float64 and cast
    back to their dtype; integer arrays (BatchNorm's ``num_batches_tracked``) are rounded.
    """
    if not records or len(records) != len(weights):
        raise ValueError("weighted_average needs as many weights as records, at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    keys = list(records[0].keys())
    out: dict[str, Array] = {}
    for key in keys:
        arrays = [rec[key].numpy() for rec in records]
        mean = sum(a.astype(np.float64) * (w / total) for a, w in zip(arrays, weights))
        dtype = arrays[0].dtype
        if np.issubdtype(dtype, np.integer):
            mean = np.rint(mean)
        out[key] = Array(np.asarray(mean, dtype=dtype))
    return ArrayRecord(out)


def weighted_metric(values: Sequence[float], weights: Sequence[float]) -> float | None:
    """Weighted mean of finite ``values``; None when no value is finite."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and np.isfinite(v) and w > 0]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total)


def has_non_finite(record: ArrayRecord) -> str | None:
    """Name of the first array holding NaN or inf (None if all finite)."""
    for key, arr in record.items():
        values = arr.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return key
    return None


def same_layout(record: ArrayRecord, reference: Mapping[str, tuple]) -> str | None:
    """Why ``record`` does not match ``reference`` (key -> shape), or None if it does."""
    if set(record.keys()) != set(reference):
        return f"keys differ from the model's ({len(record)} vs {len(reference)})"
    for key, arr in record.items():
        if tuple(arr.shape) != tuple(reference[key]):
            return f"{key} has shape {tuple(arr.shape)}, expected {tuple(reference[key])}"
    return None


def update_divergence(cloud: ArrayRecord, updates: Sequence[ArrayRecord]) -> float | None:
    """Variance of client updates (ECLM Fig. 14's gradient divergence), per parameter element.

    For every float key held by at least two updates, the updates ``d_k = w_k - w_cloud``
    are compared with their mean over the holders; the result is
    ``sum ||d_k - mean d||^2 / sum (holders x elements)``. None when no key is shared.
    """
    total, count = 0.0, 0
    for key, cloud_arr in cloud.items():
        base = cloud_arr.numpy()
        if not np.issubdtype(base.dtype, np.floating):
            continue
        deltas = [u[key].numpy().astype(np.float64) - base for u in updates if key in u]
        if len(deltas) < 2 or any(d.shape != base.shape for d in deltas):
            continue
        stacked = np.stack(deltas)
        total += float(((stacked - stacked.mean(axis=0)) ** 2).sum())
        count += stacked.size
    return total / count if count else None
