"""Width-scaled sub-models (HeteroFL, Diao et al. 2021; FedRolex, Alam et al. 2022).

A sub-model at rate ``r`` keeps ``ceil(r * C)`` channels of every hidden conv/linear
layer: the PREFIX (HeteroFL, sec. 3.1) or a window that rolls by one channel per round
(FedRolex, sec. 3). The stem keeps every input channel, the classifier every class; when
the sub-models are merged, each classifier row (and bias entry) is averaged only over the
devices that hold that class (HeteroFL's ``label_split``, :func:`covering_average`).

How the channels of each tensor are identified (from the state dict alone, so the cloud,
which holds only arrays, and the device, which holds the network, derive the same plan):

* tensors are read in state-dict order, which for the supported families (``cnn``,
  ``resnet18``, ``mlp``) is the order of the layers: every BatchNorm follows its conv;
* a tensor with >= 2 dimensions is a conv ``[out, in, k, k]`` or linear ``[out, in]``
  weight: axis 0 (out) scales unless it is the LAST such tensor (the classifier), axis 1
  (in) scales unless it is the FIRST (the stem, which sees the image);
* a 1-D tensor ``[C]`` (BatchNorm weight/bias/running stats, a conv or linear bias)
  belongs to the matrix before it and scales iff that matrix's out axis does (it must then
  have that matrix's out size, else :func:`channel_axes` refuses the network);
* 0-D tensors (``num_batches_tracked``) never scale;
* the classifier's class axis (axis 0 of the last matrix and of the 1-D tensors right
  after it, its bias) is where the label split applies (:func:`classifier_keys`).

The networks that run a sub-model (HeteroFL's scaled layers, static BN) and the measured
cost of each rate live in :mod:`models.width.layers`; how a device trains and scores one
(the label-masked loss, gradient clipping) in :mod:`models.width.training`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: HeteroFL's computation-complexity levels a..e (Diao et al. 2021, sec. 4: r = 0.5, shrinkage 1..1/16).
WIDTH_RATES = (1.0, 0.5, 0.25, 0.125, 0.0625)
#: Digits kept when ``rate * channels`` is rounded before ``ceil`` (0.1 * 30 must give 3, not 4).
_ROUNDING_DIGITS = 9


# --------------------------------------------------------------------------- channels
def check_rate(rate: float) -> float:
    """``rate`` as a float in (0, 1], or ValueError."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < float(rate) <= 1:
        raise ValueError(f"width rate must be a number in (0, 1], got {rate!r}; use one of {WIDTH_RATES}")
    return float(rate)


def kept_channels(size: int, rate: float) -> int:
    """Channels a sub-model keeps of ``size``: ``ceil(rate * size)`` (HeteroFL's ``np.ceil``), >= 1."""
    return max(1, math.ceil(round(check_rate(rate) * size, _ROUNDING_DIGITS)))


def channel_window(size: int, rate: float, offset: int = 0) -> np.ndarray:
    """Indices of the kept channels: ``(arange(kept) - offset) mod size``.

    The channel order ``arange(size)`` rolled forward by ``offset`` positions, of which
    the first ``kept`` are kept (FedRolex ``resnet_server.py`` ``split_model``:
    ``torch.roll(arange(size), rounds % size)[:kept]``). ``offset`` 0 is HeteroFL's prefix
    (``fed.py`` ``split_model``); FedRolex's offset is the number of rounds before this
    one, so round 2 keeps ``[size - 1, 0, 1, ...]`` and the window wraps around.
    """
    if size < 1:
        raise ValueError(f"a channel axis needs size >= 1, got {size}")
    return (np.arange(kept_channels(size, rate)) - int(offset)) % size


def channel_axes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Which axes of each tensor are channel axes that shrink with the rate (module docstring)."""
    keys = list(shapes)
    matrices = [k for k in keys if len(shapes[k]) >= 2]
    if not matrices:
        raise ValueError("the state dict has no conv or linear weight; width scaling needs one")
    first, last = matrices[0], matrices[-1]
    axes: dict[str, tuple[int, ...]] = {}
    out_size: int | None = None  # out channels of the last scaled matrix, None if unscaled
    for key in keys:
        shape = tuple(shapes[key])
        if len(shape) >= 2:
            out_size = shape[0] if key != last else None
            axes[key] = tuple(a for a, scaled in ((0, key != last), (1, key != first)) if scaled)
        elif len(shape) == 1 and out_size is not None:
            if shape[0] != out_size:
                raise ValueError(
                    f"cannot tell the channels of {key} {shape}: the layer before it has {out_size} outputs; "
                    "width scaling needs every BatchNorm/bias right after its conv or linear in the state dict"
                )
            axes[key] = (0,)
        else:
            axes[key] = ()
    return axes


def classifier_keys(shapes: Mapping[str, Sequence[int]]) -> tuple[str, ...]:
    """The tensors whose axis 0 is the class axis: the classifier's weight and its bias.

    The classifier is the last conv/linear weight (it keeps every class); its bias is a
    1-D tensor after it with one entry per class. These are the tensors HeteroFL's
    ``fed.py`` ``combine`` merges by ``label_split`` (``output_weight_name`` /
    ``output_bias_name`` of its conv model, the ``linear`` keys of its ResNets).
    """
    keys = list(shapes)
    matrices = [k for k in keys if len(shapes[k]) >= 2]
    if not matrices:
        raise ValueError("the state dict has no conv or linear weight; width scaling needs one")
    last = matrices[-1]
    classes = tuple(shapes[last])[0]
    after = keys[keys.index(last) + 1:]
    return (last, *(k for k in after if tuple(shapes[k]) == (classes,)))


def sub_shapes(shapes: Mapping[str, Sequence[int]], rate: float) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of the sub-model at ``rate``."""
    axes = channel_axes(shapes)
    return {
        key: tuple(kept_channels(n, rate) if a in axes[key] else n for a, n in enumerate(shape))
        for key, shape in shapes.items()
    }


def _index(shape: Sequence[int], axes: Iterable[int], rate: float, offset: int, rows: np.ndarray | None = None) -> tuple:
    """Open-mesh index of a sub-model's elements in the full tensor (``rows``: only these of axis 0)."""
    scaled = set(axes)
    ranges = [channel_window(n, rate, offset) if a in scaled else np.arange(n) for a, n in enumerate(shape)]
    if rows is not None:
        ranges[0] = rows
    return np.ix_(*ranges)


# --------------------------------------------------------------------------- extract & merge
def extract(state: Mapping[str, np.ndarray], rate: float, offset: int = 0) -> dict[str, np.ndarray]:
    """The sub-model's arrays: each tensor cut to the kept channels (copies, same dtypes)."""
    axes = channel_axes({k: np.shape(v) for k, v in state.items()})
    out = {}
    for key, value in state.items():
        value = np.asarray(value)
        out[key] = np.array(value[_index(value.shape, axes[key], rate, offset)], dtype=value.dtype)
    return out


@dataclass(frozen=True)
class SubModelUpdate:
    """One device's trained sub-model and where it sits in the full model.

    Attributes
    ----------
    arrays : Mapping[str, np.ndarray]
        The sub-model's state (the full model's keys, cut shapes).
    rate : float
        Its width rate.
    offset : int
        Its window roll (:func:`channel_window`; 0 for HeteroFL's prefix).
    weight : float
        Its weight in the covering average (1 in HeteroFL's reference code).
    num_examples : float
        Samples its BN statistics were measured on (their weight in :func:`pooled_bn_statistics`).
    classes : tuple of int, optional
        The classes of the device's training data: the only classifier rows (and bias
        entries) it contributes (HeteroFL ``fed.py`` ``combine``, ``label_split``). None:
        every row.
    """

    arrays: Mapping[str, np.ndarray]
    rate: float
    offset: int = 0
    weight: float = 1.0
    num_examples: float = 1.0
    classes: tuple[int, ...] | None = None


class _Part(NamedTuple):
    """What one update adds to one tensor: its array, window, weight and (classifier only) rows."""

    array: np.ndarray
    rate: float
    offset: int
    weight: float
    rows: np.ndarray | None = None


def class_rows(classes: Iterable[int] | None, num_classes: int) -> np.ndarray | None:
    """``classes`` as sorted unique row indices, or ValueError naming a class outside ``[0, num_classes)``."""
    if classes is None:
        return None
    classes = list(classes)
    odd = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
    if odd:
        raise ValueError(f"classes must be ints, got {odd[0]!r}")
    rows = np.unique(np.asarray(classes, dtype=np.int64))
    bad = rows[(rows < 0) | (rows >= num_classes)]
    if bad.size:
        raise ValueError(f"class {int(bad[0])} is not one of the classifier's {num_classes} classes (0..{num_classes - 1})")
    return rows


def _covered_mean(value: np.ndarray, axes: Sequence[int], key: str, parts: Sequence[_Part]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean over the parts covering each element, and the covered mask."""
    total, count = np.zeros(value.shape), np.zeros(value.shape)
    for part in parts:
        if not part.weight > 0:
            raise ValueError(f"{key}: covering weights must be > 0, got {part.weight}")
        window = _index(value.shape, axes, part.rate, part.offset)
        array = np.asarray(part.array, dtype=np.float64)
        if array.shape != total[window].shape:
            raise ValueError(f"{key}: update at rate {part.rate} has shape {array.shape}, expected {total[window].shape}")
        if part.rows is not None:
            window, array = _index(value.shape, axes, part.rate, part.offset, part.rows), array[part.rows]
        total[window] += part.weight * array
        count[window] += part.weight
    covered = count > 0
    return np.where(covered, total / np.where(covered, count, 1.0), 0.0), covered


def covering_average(state: Mapping[str, np.ndarray], updates: Sequence[SubModelUpdate]) -> dict[str, np.ndarray]:
    """Per-element weighted mean over the sub-models that cover each element.

    ``w[i] = sum_k a_k * w_k[i] / sum_k a_k`` over the updates k whose window holds element
    i and, for a classifier row or bias entry (:func:`classifier_keys`), whose device holds
    that class (HeteroFL ``fed.py`` ``combine``: ``a_k = 1``, a count; classifier rows by
    ``label_split``). Elements no update covers keep their value in ``state``. Integer
    tensors are rounded; every dtype is kept.
    """
    shapes = {k: np.shape(v) for k, v in state.items()}
    axes, heads = channel_axes(shapes), set(classifier_keys(shapes))
    out = {}
    for key, value in state.items():
        value = np.asarray(value)
        parts = [
            _Part(u.arrays[key], u.rate, u.offset, u.weight, class_rows(u.classes, value.shape[0]) if key in heads else None)
            for u in updates
        ]
        mean, covered = _covered_mean(value, axes[key], key, parts)
        merged = np.where(covered, mean, value)
        if np.issubdtype(value.dtype, np.integer):
            merged = np.rint(merged)
        out[key] = np.asarray(merged, dtype=value.dtype)
    return out


#: Buffer names of torch BatchNorm's running statistics (``torch.nn.modules.batchnorm._NormBase``).
RUNNING_MEAN, RUNNING_VAR = "running_mean", "running_var"


def pooled_bn_statistics(state: Mapping[str, np.ndarray], updates: Sequence[SubModelUpdate]) -> dict[str, np.ndarray]:
    """BN running statistics of the pooled data of the updates that cover each channel.

    With ``n_k`` samples, means ``mu_k`` and variances ``var_k`` (each device's static BN):
    ``mu = sum n_k mu_k / N`` and ``var = sum n_k (var_k + mu_k^2) / N - mu^2`` (law of total
    variance): the statistics static BN would measure on the union of the devices' data
    for that layer's inputs (HeteroFL sec. 3.2 accumulates them over clients). Averaging
    variances alone would miss the spread between devices' means. Channels nobody covered
    keep ``state``'s statistics. Returns only the ``running_mean``/``running_var`` keys.
    """
    axes = channel_axes({k: np.shape(v) for k, v in state.items()})
    out = {}
    for key in state:
        prefix = key[: -len(RUNNING_MEAN)]
        var_key = prefix + RUNNING_VAR
        if not key.endswith("." + RUNNING_MEAN) or var_key not in state:
            continue
        old_mean, old_var = np.asarray(state[key]), np.asarray(state[var_key])
        means = [_Part(u.arrays[key], u.rate, u.offset, u.num_examples) for u in updates]
        moments = [
            _Part(np.asarray(u.arrays[var_key], np.float64) + np.square(np.asarray(u.arrays[key], np.float64)),
                  u.rate, u.offset, u.num_examples)
            for u in updates
        ]
        mean, covered = _covered_mean(old_mean, axes[key], key, means)
        second, _ = _covered_mean(old_var, axes[var_key], var_key, moments)
        var = np.maximum(second - np.square(mean), 0.0)
        out[key] = np.where(covered, mean, old_mean).astype(old_mean.dtype)
        out[var_key] = np.where(covered, var, old_var).astype(old_var.dtype)
    return out
