"""Device partitions cached on disk, so a run with a known fleet skips flwr-datasets.

Splitting the pool over devices needs flwr-datasets' partitioners, and importing them (with
Hugging Face ``datasets`` under them) costs 1.5-2 s of every run's start-up on this machine,
more than the split itself. The split is a pure function of the pool's labels, the partition
settings, the number of devices, the seed and the two libraries' versions; this module keys
a file on all of them (``dataset.cache_dir``; empty: no cache) and reads the rows back
without importing either library. A file that cannot be read, or whose rows do not fit the
pool, is recomputed and rewritten (with a warning), never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

import numpy as np

from experiments.data import partition as part
from experiments.results.atomic import write_atomically
from experiments.schema import PartitionConfig

logger = logging.getLogger(__name__)

#: Bumped when the file layout or the meaning of the rows changes.
CACHE_FORMAT = 1
#: Libraries whose versions enter the key (a new partitioner release may split differently).
KEYED_LIBRARIES = ("flwr-datasets", "datasets")


def partitions(pool_labels: np.ndarray, partition: PartitionConfig, num_partitions: int, seed: int,
               cache_dir: str | None) -> list[np.ndarray]:
    """:func:`experiments.data.partition.partition_pool`, read from / written to ``cache_dir``.

    Returns
    -------
    list of np.ndarray
        Sorted int64 pool rows of every partition (the same values ``partition_pool`` returns).
    """
    if not cache_dir:
        return part.partition_pool(pool_labels, partition, num_partitions, seed)
    path = cache_path(pool_labels, partition, num_partitions, seed, cache_dir)
    rows = _read(path, num_partitions, len(pool_labels))
    if rows is None:
        rows = part.partition_pool(pool_labels, partition, num_partitions, seed)
        _write(path, rows)
    return rows


def cache_path(pool_labels: np.ndarray, partition: PartitionConfig, num_partitions: int, seed: int,
               cache_dir: str) -> Path:
    """The file that holds this split: ``<cache_dir>/partitions/partitions-<key>.npz``."""
    digest = hashlib.sha256(np.ascontiguousarray(pool_labels, dtype=np.int64).tobytes())
    settings = {"format": CACHE_FORMAT, "partition": dataclasses.asdict(partition), "devices": num_partitions,
                "seed": seed, "libraries": {name: _version(name) for name in KEYED_LIBRARIES}}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return Path(cache_dir).expanduser() / "partitions" / f"partitions-{digest.hexdigest()[:20]}.npz"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _read(path: Path, num_partitions: int, pool_size: int) -> list[np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as saved:
            rows, offsets = saved["rows"], saved["offsets"]
        ok = (offsets.shape == (num_partitions + 1,) and offsets[0] == 0 and offsets[-1] == len(rows)
              and bool(np.all(np.diff(offsets) >= 0)) and rows.dtype == np.int64
              and (len(rows) == 0 or (rows.min() >= 0 and rows.max() < pool_size)))
        if ok:
            return [rows[offsets[k]:offsets[k + 1]].copy() for k in range(num_partitions)]
        reason = "its rows do not fit this pool"
    except (OSError, ValueError, KeyError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    logger.warning("cached device partitions %s are unusable (%s); splitting again", path, reason)
    return None


def _write(path: Path, rows: list[np.ndarray]) -> None:
    """Write atomically (:func:`~experiments.results.atomic.write_atomically`): a reader never sees half a file."""
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda handle: np.savez(handle, rows=flat, offsets=offsets))
    except OSError as exc:  # a read-only or full cache costs start-up time, never the run
        logger.warning("could not cache device partitions in %s: %s", path.parent, exc)
