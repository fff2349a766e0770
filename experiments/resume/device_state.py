"""Device state that must survive a restart of the simulation, for runs that resume.

Online devices (CEMA and the TTA baselines) keep their stream position and their method's
state in Flower's ``context.state``, which a new simulation starts empty. So each such
device also writes that state, after every round it takes part in, to
``<run dir>/devices/<partition>/round-NNNNNN.npz`` (an int ``index`` and the uint8 ``blob``
the handler serialised; atomic writes, read with ``allow_pickle=False``). When a resumed run
sends a device its first message, the device reloads the newest file of a round before the
current one (:meth:`DeviceStateStore.load_before`); the server first discards files of rounds
after the checkpoint (:func:`discard_after`), which the interrupted attempt wrote.

A device keeps only what a resume can need: every file after the newest checkpoint round
before its latest save, plus the newest file at or before that round.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np

from experiments.results.atomic import write_atomically
from experiments.schema import RunConfig

#: Folder of the devices' saved state inside a run folder.
DEVICE_STATE_FOLDER = "devices"
#: One file per device and round it took part in.
STATE_FILE = "round-{:06d}.npz"
_PREFIX, _SUFFIX = "round-", ".npz"


def device_state_dir(cfg: RunConfig, run_dir: Path | None = None) -> Path | None:
    """Where devices save their state: ``<run_dir or cfg.output_dir>/devices``.

    None when the run does not checkpoint (``checkpoint_every=0``) or no folder is known
    (``flwr run`` without ``output_dir``).
    """
    base = run_dir if run_dir is not None else cfg.output_dir
    if cfg.checkpoint_every == 0 or base is None or str(base) == "":
        return None
    return Path(base) / DEVICE_STATE_FOLDER


class DeviceStateStore:
    """One device's saved online state (implements :class:`clients.base.ProgressStore`).

    Parameters
    ----------
    folder : Path
        The run's device-state folder (:func:`device_state_dir`).
    partition_id : int
        The device.
    checkpoint_every : int
        The run's checkpoint period k (>= 1): checkpoints follow rounds k, 2k, ...
    restore : bool
        Whether :meth:`load_before` may return saved state (only in a resumed run; a fresh
        run never reads what another run left).
    """

    def __init__(self, folder: Path, partition_id: int, checkpoint_every: int, restore: bool) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every}: a device store needs checkpoints (k >= 1)")
        self.folder = Path(folder) / str(int(partition_id))
        self.checkpoint_every = checkpoint_every
        self.restore = restore

    def save(self, server_round: int, index: int, blob: bytes | None) -> None:
        """Save the state the device holds after ``server_round``; drop files no resume needs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {"index": np.array(int(index), dtype=np.int64)}
        if blob is not None:
            arrays["blob"] = np.frombuffer(blob, dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomically(self.folder / STATE_FILE.format(server_round), lambda handle: handle.write(buffer.getvalue()))
        self._prune(server_round)

    def load_before(self, server_round: int) -> tuple[int, bytes | None] | None:
        """``(index, blob)`` saved after the newest round before ``server_round`` (None: nothing)."""
        if not self.restore:
            return None
        earlier = [r for r in self.rounds() if r < server_round]
        if not earlier:
            return None
        with np.load(self.folder / STATE_FILE.format(earlier[-1]), allow_pickle=False) as saved:
            index = int(saved["index"])
            blob = saved["blob"].tobytes() if "blob" in saved.files else None
        return index, blob

    def rounds(self) -> list[int]:
        """Rounds with a saved file, in order."""
        if not self.folder.is_dir():
            return []
        return sorted(_round_of(p) for p in self.folder.iterdir() if _round_of(p) is not None)

    def _prune(self, latest: int) -> None:
        """Keep files after the last checkpoint round before ``latest`` and the newest one at or before it."""
        last_checkpoint = (latest - 1) // self.checkpoint_every * self.checkpoint_every
        older = [r for r in self.rounds() if r <= last_checkpoint]
        for server_round in older[:-1]:
            (self.folder / STATE_FILE.format(server_round)).unlink(missing_ok=True)


def discard_after(folder: Path, server_round: int) -> int:
    """Delete every device's files of rounds after ``server_round`` (a resume's lost attempt); returns how many."""
    removed = 0
    if not Path(folder).is_dir():
        return removed
    for path in Path(folder).glob(f"*/{_PREFIX}*{_SUFFIX}"):
        number = _round_of(path)
        if number is not None and number > server_round:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def remove_device_states(folder: Path) -> None:
    """Delete every device's saved state (a fresh run in a folder that held another run)."""
    shutil.rmtree(folder, ignore_errors=True)


def _round_of(path: Path) -> int | None:
    name = path.name
    if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
        return None
    digits = name[len(_PREFIX) : -len(_SUFFIX)]
    return int(digits) if digits.isdigit() else None
