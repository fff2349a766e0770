"""Start or resume a run in its folder, and checkpoint it as it goes.

``resume=true`` continues the run whose folder is the run directory (``hydra.run.dir`` or
``output_dir``) from its newest checkpoint (``experiments/resume/checkpoint.py``). It is refused,
with one message naming the reason, when the folder holds no checkpoint, when the
configuration differs from the interrupted run's outside
:data:`experiments.resume.checkpoint.RESUME_FREE_KEYS`, or when the algorithm's devices keep state
between rounds that the interrupted run did not save. A fresh run clears what another run
may have left in its folder (checkpoints, saved device state).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from experiments.algorithms import ALGORITHMS
from experiments.results.writer import ResultsWriter
from experiments.resume.checkpoint import (
    Checkpoint,
    checkpoint_folder,
    config_differences,
    is_due,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
)
from experiments.resume.device_state import discard_after, remove_device_states
from experiments.schema import ConfigError, RunConfig, to_dict
from strategies.base import EdgeCloudStrategy

logger = logging.getLogger(__name__)

#: ``Checkpoint.meta`` key: whether the devices saved their online state (device_state.py).
DEVICE_STATE_SAVED = "device_state_saved"
#: How many differing config keys a refused resume names.
MAX_DIFFERENCES_SHOWN = 10


def resumable_checkpoint(cfg: RunConfig, run_dir: Path, device_dir: Path | None) -> Checkpoint:
    """The checkpoint ``cfg`` (with ``resume=true``) continues from, after every check.

    Parameters
    ----------
    cfg : RunConfig
        The resumed run's configuration.
    run_dir : Path
        The interrupted run's folder.
    device_dir : Path or None
        Where the resumed run's devices read their saved state (None: nowhere).

    Raises
    ------
    ConfigError
        No (readable) checkpoint, a configuration that differs from the interrupted run's,
        or an algorithm with device state that cannot be restored.
    """
    try:
        checkpoint = load_checkpoint(run_dir)
    except ValueError as exc:
        raise ConfigError(f"resume=true: {exc}") from exc
    if checkpoint is None:
        raise ConfigError(
            f"resume=true but {checkpoint_folder(run_dir)} holds no checkpoint: the run stopped before its first "
            f"checkpoint (checkpoint_every={cfg.checkpoint_every}) or this is not its folder; point hydra.run.dir "
            "(or output_dir) at the interrupted run's folder, or start the run again without resume=true"
        )
    differences = config_differences(checkpoint.config, to_dict(cfg))
    if differences:
        shown = "; ".join(differences[:MAX_DIFFERENCES_SHOWN])
        more = f" and {len(differences) - MAX_DIFFERENCES_SHOWN} more" if len(differences) > MAX_DIFFERENCES_SHOWN else ""
        raise ConfigError(
            f"resume=true needs the interrupted run's configuration, but {len(differences)} key(s) differ "
            f"(saved -> now): {shown}{more}; repeat the run's original overrides and add resume=true "
            "(the saved configuration is the 'config' of its results.json)"
        )
    algorithm = ALGORITHMS[cfg.algorithm.name]
    if algorithm.device_state and not (checkpoint.meta.get(DEVICE_STATE_SAVED) and device_dir is not None):
        raise ConfigError(
            f"cannot resume {cfg.algorithm.name}: its devices keep state between rounds in context.state "
            "(stream position, adapter or filter) and the interrupted run did not save it to the run folder "
            "(it had checkpoint_every=0, or ran under `flwr run` without output_dir); start it again without resume=true"
        )
    return checkpoint


def start_or_resume(cfg: RunConfig, run_dir: Path, device_dir: Path | None) -> Checkpoint | None:
    """Prepare ``run_dir``: the checkpoint to continue from (resume), or None after clearing old state."""
    if not cfg.resume:
        remove_checkpoints(run_dir)
        if device_dir is not None:
            remove_device_states(device_dir)
        return None
    checkpoint = resumable_checkpoint(cfg, run_dir, device_dir)
    if device_dir is not None:
        dropped = discard_after(device_dir, checkpoint.round)
        logger.info("resuming after round %d; %d device state file(s) of later rounds discarded", checkpoint.round, dropped)
    return checkpoint


def devices_saved(checkpoint: Checkpoint | None, device_dir: Path | None) -> bool:
    """Whether every device's online state since round 1 is saved: now, and before a resume."""
    return device_dir is not None and (checkpoint is None or bool(checkpoint.meta.get(DEVICE_STATE_SAVED)))


class Checkpointer:
    """The ``after_round`` hook of :meth:`EdgeCloudStrategy.start`: checkpoint when one is due.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    cfg : RunConfig
        The run's configuration (``checkpoint_every``, ``rounds``).
    strategy : EdgeCloudStrategy
        Whose :meth:`state_dict` goes into each checkpoint.
    writer : ResultsWriter
        Whose round records go into each checkpoint.
    config : dict
        The configuration stored in the checkpoint (the run's as it first started).
    meta : dict
        Stored as :attr:`Checkpoint.meta`.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        strategy: EdgeCloudStrategy,
        writer: ResultsWriter,
        config: dict[str, Any],
        meta: dict[str, Any],
    ) -> None:
        self.run_dir = Path(run_dir)
        self.every = cfg.checkpoint_every
        self.num_rounds = cfg.rounds
        self.strategy = strategy
        self.writer = writer
        self.config = config
        self.meta = meta

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        """Write the checkpoint of ``server_round`` if one is due (every k rounds and after the last)."""
        if not is_due(server_round, self.every, self.num_rounds):
            return
        checkpoint = Checkpoint(
            round=server_round,
            arrays=arrays,
            strategy_state=self.strategy.state_dict(),
            records=self.writer.rounds,
            config=self.config,
            meta=self.meta,
        )
        folder = save_checkpoint(self.run_dir, checkpoint)
        logger.debug("checkpoint of round %d written to %s", server_round, folder)
