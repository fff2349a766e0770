"""Checkpoints of a run: the cloud model, the strategy's state and the round records.

Layout inside a run folder::

    checkpoint/round-000004/state.json    # round, config, round records, strategy state (JSON)
    checkpoint/round-000004/cloud.npz     # the cloud model's arrays after that round
    checkpoint/round-000004/strategy.npz  # the strategy state's tensors (experiments/resume/state_codec.py)

A checkpoint is written into a hidden temporary folder beside the others (every file
flushed and fsynced), then renamed to ``round-NNNNNN`` in one step, and only then are older
checkpoints removed: a crash at any moment leaves the previous complete checkpoint (or the
new one) and never a half-written one. :func:`load_checkpoint` takes the newest
``round-*`` folder. Nothing is pickled: ``.npz`` files are read with ``allow_pickle=False``.

Resuming needs the same configuration, except the keys in :data:`RESUME_FREE_KEYS`
(how and where the run executes, not what it computes); :func:`config_differences` names
any other difference.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from experiments.results.atomic import fsync_folder, write_atomically
from experiments.resume.state_codec import decode_state, encode_state

#: Folder of the checkpoints inside a run folder.
CHECKPOINT_FOLDER = "checkpoint"
#: Name of one checkpoint's folder; the round is zero-padded so names sort by round.
ROUND_FOLDER = "round-{:06d}"
ROUND_PREFIX = "round-"
#: Files of one checkpoint.
STATE_FILE, CLOUD_FILE, STRATEGY_FILE = "state.json", "cloud.npz", "strategy.npz"
#: Version of the layout above; a checkpoint of another version is refused.
FORMAT_VERSION = 1
#: Config keys a resumed run may change: they decide how and where it runs, not its numbers
#: (``engine.*``: Ray address, resources, timeouts, logs; the pre-training cache folder).
RESUME_FREE_KEYS = ("resume", "output_dir", "checkpoint_every", "engine", "pretrain.cache_dir", "dataset.cache_dir")


@dataclass
class Checkpoint:
    """Everything a run needs to continue after round ``round``.

    Attributes
    ----------
    round : int
        The last finished round.
    arrays : ArrayRecord
        The cloud model after that round.
    strategy_state : dict
        What :meth:`strategies.base.EdgeCloudStrategy.state_dict` returned.
    records : list of dict
        The round records of rounds 1..``round``, as in ``results.json``.
    config : dict
        The run's configuration (``experiments.config.to_dict``) when it started.
    meta : dict
        Facts about how the run saved its state (e.g. ``device_state_saved``).
    """

    round: int
    arrays: ArrayRecord
    strategy_state: dict[str, Any]
    records: list[dict[str, Any]]
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    write_atomically(path, lambda handle: np.savez(handle, **arrays))


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1).encode("utf-8")  # NaN/inf allowed: the state may hold them
    write_atomically(path, lambda handle: handle.write(text))


# --------------------------------------------------------------------------- save / load
def checkpoint_folder(run_dir: Path) -> Path:
    """``<run_dir>/checkpoint``."""
    return Path(run_dir) / CHECKPOINT_FOLDER


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` as ``<run_dir>/checkpoint/round-NNNNNN`` and drop older ones.

    Returns
    -------
    Path
        The new checkpoint's folder.
    """
    root = checkpoint_folder(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / ROUND_FOLDER.format(checkpoint.round)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        tree, tensors = encode_state(checkpoint.strategy_state)
        names = list(checkpoint.arrays.keys())
        _write_npz(staging / CLOUD_FILE, {f"a{i}": checkpoint.arrays[name].numpy() for i, name in enumerate(names)})
        _write_npz(staging / STRATEGY_FILE, tensors)
        state = {
            "format": FORMAT_VERSION,
            "round": checkpoint.round,
            "cloud_keys": names,
            "strategy": tree,
            "records": checkpoint.records,
            "config": checkpoint.config,
            "meta": checkpoint.meta,
        }
        _write_json(staging / STATE_FILE, state)
        if final.exists():  # only a folder reused by another run: fresh runs remove old checkpoints first
            shutil.rmtree(final)
        os.rename(staging, final)  # the one step that makes the checkpoint visible
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_folder(root)
    for old in _round_folders(root):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``run_dir``, or None if there is none.

    Raises
    ------
    ValueError
        If the newest checkpoint is unreadable or of another format version.
    """
    folders = _round_folders(checkpoint_folder(run_dir))
    if not folders:
        return None
    folder = folders[-1]
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        with np.load(folder / CLOUD_FILE, allow_pickle=False) as cloud:
            values = [np.array(cloud[f"a{i}"]) for i in range(len(state["cloud_keys"]))]
        with np.load(folder / STRATEGY_FILE, allow_pickle=False) as npz:
            tensors = {name: np.array(npz[name]) for name in npz.files}
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"checkpoint {folder} is unreadable ({exc}); delete it to resume from an older one") from exc
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {folder} has format {state.get('format')}, this code reads {FORMAT_VERSION}")
    arrays = ArrayRecord({name: Array(value) for name, value in zip(state["cloud_keys"], values)})
    return Checkpoint(
        round=int(state["round"]),
        arrays=arrays,
        strategy_state=decode_state(state["strategy"], tensors),
        records=list(state["records"]),
        config=dict(state["config"]),
        meta=dict(state.get("meta", {})),
    )


def _round_folders(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (temporary ones are hidden)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(ROUND_PREFIX))


def remove_checkpoints(run_dir: Path) -> None:
    """Delete every checkpoint of ``run_dir`` (a fresh run in a folder that held another run)."""
    shutil.rmtree(checkpoint_folder(run_dir), ignore_errors=True)


def is_due(server_round: int, every: int, num_rounds: int) -> bool:
    """Whether a checkpoint follows ``server_round``: every ``every`` rounds and after the last.

    ``every == 0`` never checkpoints.
    """
    return every > 0 and (server_round % every == 0 or server_round == num_rounds)


# --------------------------------------------------------------------------- config check
def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       free_keys: tuple[str, ...] = RESUME_FREE_KEYS) -> list[str]:
    """``key: saved -> current`` for every leaf that differs, outside ``free_keys`` (and their sub-keys)."""
    old, new = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(old.keys() | new.keys()):
        if _is_free(key, free_keys):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            diffs.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return diffs


def _is_free(key: str, free_keys: tuple[str, ...]) -> bool:
    return any(key == free or key.startswith(f"{free}.") for free in free_keys)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    return flat
