"""Plain-data codec for checkpointed state: JSON for structure, one array table for tensors.

A strategy's :meth:`~strategies.base.EdgeCloudStrategy.state_dict` is a nest of dicts, lists,
tuples, numbers, strings, ``None``, numpy arrays and torch tensors (optimizer states included,
whose dicts have integer keys). :func:`encode_state` splits it into a JSON-able tree and a
flat ``{name: numpy array}`` table (saved with ``numpy.savez``, loaded with
``allow_pickle=False``); :func:`decode_state` puts it back together. Nothing is pickled, so a
checkpoint can be read without trusting the code that wrote it.

Markers in the JSON tree are dicts with the single reserved key :data:`MARK`:
``{"__state__": "numpy", "name": ...}`` (a numpy array), ``"torch"`` (a torch tensor),
``"tuple"`` (``items``) and ``"dict"`` (``items``: key/value pairs, for dicts whose keys are not
all strings). Floats keep NaN and infinities (Python's JSON extension), numpy scalars become
Python numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: Reserved key of the marker dicts; a state may not use it as a dict key of its own.
MARK = "__state__"
#: Python types that JSON stores as they are.
_SCALARS = (bool, int, float, str, type(None))


def encode_state(state: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Split ``state`` into a JSON-able tree and a table of arrays.

    Parameters
    ----------
    state
        Dicts (any scalar keys), lists, tuples, ``bool``/``int``/``float``/``str``/``None``,
        numpy scalars and arrays, torch tensors (CPU, any numpy-compatible dtype).

    Returns
    -------
    tree, arrays
        ``json.dumps(tree)`` succeeds; ``arrays`` maps generated names to numpy arrays.

    Raises
    ------
    ValueError
        For a value of any other type (e.g. an ``nn.Module``: pass its ``state_dict()``), or a
        dict that uses the reserved key :data:`MARK`.
    """
    arrays: dict[str, np.ndarray] = {}
    return _encode(state, arrays, "state"), arrays


def decode_state(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """Rebuild what :func:`encode_state` split (tensors as torch, arrays as numpy).

    Raises
    ------
    ValueError
        If a marker names an array the table does not hold or has an unknown kind.
    """
    if isinstance(tree, list):
        return [decode_state(item, arrays) for item in tree]
    if not isinstance(tree, dict):
        return tree
    if MARK not in tree:
        return {key: decode_state(value, arrays) for key, value in tree.items()}
    kind = tree[MARK]
    if kind in ("numpy", "torch"):
        name = tree["name"]
        if name not in arrays:
            raise ValueError(f"state refers to array {name!r} that the checkpoint does not hold; the files are mixed up")
        array = np.array(arrays[name])  # a writable copy, detached from the npz file
        return torch.from_numpy(array) if kind == "torch" else array
    if kind == "tuple":
        return tuple(decode_state(item, arrays) for item in tree["items"])
    if kind == "dict":
        return {decode_state(key, arrays): decode_state(value, arrays) for key, value in tree["items"]}
    raise ValueError(f"unknown state marker {kind!r}; the checkpoint was written by another version")


def _encode(value: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return _array(value.detach().cpu().numpy(), "torch", arrays)
    if isinstance(value, np.ndarray):
        return _array(value, "numpy", arrays)
    if isinstance(value, Mapping):
        if MARK in value:
            raise ValueError(f"{path} uses the reserved key {MARK!r}; rename it")
        if all(isinstance(key, str) for key in value):
            return {key: _encode(item, arrays, f"{path}.{key}") for key, item in value.items()}
        items = [[_encode(key, arrays, path), _encode(item, arrays, f"{path}[{key!r}]")] for key, item in value.items()]
        return {MARK: "dict", "items": items}
    if isinstance(value, tuple):
        return {MARK: "tuple", "items": [_encode(item, arrays, f"{path}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, arrays, f"{path}[{i}]") for i, item in enumerate(value)]
    raise ValueError(
        f"{path} is a {type(value).__name__}, which a checkpoint cannot hold; return plain data "
        "(dicts, lists, numbers, strings, numpy arrays, tensors) from state_dict()"
    )


def _array(array: np.ndarray, kind: str, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    if array.dtype == object:
        raise ValueError("object arrays cannot be checkpointed without pickling; store numbers")
    name = f"a{len(arrays)}"
    arrays[name] = np.ascontiguousarray(array)
    return {MARK: kind, "name": name}
