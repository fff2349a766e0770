"""``python -m experiments.run [overrides]``: one simulation (or a Hydra multirun sweep).

Hydra composes ``conf/``; the config is validated into a :class:`RunConfig` before the
simulation starts; it writes ``results.json`` and plots into Hydra's run directory.
A job that fails leaves an error record in its folder; in a multirun sweep the next
job starts anyway, and the process exits non-zero at the end if any job failed.
``resume=true`` (with ``hydra.run.dir`` naming the interrupted run's folder) continues a run
from its last checkpoint (``experiments/resume/checkpointer.py``).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import experiments  # noqa: F401  (offline switches first)
from experiments.config import from_hydra
from experiments.schema import ConfigError

logger = logging.getLogger(__name__)
#: Libraries that log set-up chatter at INFO through Hydra's root handler.
NOISY_LOGGERS = ("alembic", "filelock", "urllib3", "datasets")
_FAILED_JOBS: list[str] = []
#: Exit code of a run whose configuration is invalid (like argparse's usage errors).
CONFIG_ERROR_EXIT = 2
#: Exit code of a run (or sweep) in which a simulation failed.
RUN_FAILED_EXIT = 1


def write_error_record(run_dir: Path, error: BaseException) -> Path:
    """``error.json`` beside the results: what failed and the traceback."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "error.json"
    record = {
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(error)),
    }
    path.write_text(json.dumps(record, indent=2))
    return path


def preflight(cfg, run_dir: Path | None = None) -> None:
    """Load the data, split the fleet and build the network now: bad settings fail before the simulation.

    With ``resume=true`` the checkpoint in ``run_dir`` is checked too (it exists, its
    configuration matches, the algorithm's device state was saved).
    """
    from experiments.algorithms import ALGORITHMS
    from experiments.data import build_federated_data
    from experiments.pretrain.networks import build_run_model

    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    data.preflight()
    try:
        model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    ALGORITHMS[cfg.algorithm.name].check_model(model)
    if cfg.resume and run_dir is not None:
        from experiments.resume.checkpointer import resumable_checkpoint
        from experiments.resume.device_state import device_state_dir

        resumable_checkpoint(cfg, run_dir, device_state_dir(cfg, run_dir))


def exit_if_sweep_failed() -> None:
    """After a sweep: name the failed jobs and exit non-zero (the sweep itself went on)."""
    if _FAILED_JOBS:
        print(f"{len(_FAILED_JOBS)} job(s) failed: " + ", ".join(_FAILED_JOBS), file=sys.stderr)
        sys.exit(RUN_FAILED_EXIT)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(hydra_cfg: DictConfig) -> None:
    """Validate the composed config, run the simulation, keep going on failure in sweeps."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    hydra_runtime = HydraConfig.get()
    multirun = hydra_runtime.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_runtime.runtime.output_dir)
    try:
        _run_job(hydra_cfg, run_dir, multirun)
    finally:
        from experiments.engine import forkserver as engine_forkserver
        engine_forkserver.stop()  # a job that failed before its simulation leaves no fork server behind


def _run_job(hydra_cfg: DictConfig, run_dir: Path, multirun: bool) -> None:
    """Validate, check and simulate one job; its failure is recorded (see :func:`main`)."""
    try:
        cfg = from_hydra(hydra_cfg)
        print(run_header(cfg, run_dir), flush=True)
        from experiments.engine.worker import start_worker_server

        start_worker_server(cfg)  # the workers' imports and caches, on the other core, during the preflight
        preflight(cfg, run_dir)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        if not multirun:
            sys.exit(CONFIG_ERROR_EXIT)
        write_error_record(run_dir, exc)
        _FAILED_JOBS.append(str(run_dir))
        return
    except Exception as exc:  # data or network set-up failed: recorded like a crashed run
        record_failed_job(run_dir, exc, multirun)
        return
    from experiments.engine.simulation import simulate

    try:
        simulate(cfg, run_dir)
    except Exception as exc:  # a failed job must never stop the sweep or lose its record
        record_failed_job(run_dir, exc, multirun)
        return
    print_closing_summary(run_dir, multirun)


def print_closing_summary(run_dir: Path, multirun: bool) -> None:
    """The finished run's before/after table, files and next commands (a sweep's jobs: the results path)."""
    from experiments.algorithms import ALGORITHMS
    from experiments.results.closing import closing_summary
    from experiments.results.writer import load_results

    if multirun:
        print(f"results: {run_dir / 'results.json'}")
        return
    results = load_results(run_dir)
    plugin = ALGORITHMS.get(str((results.get("config") or {}).get("algorithm", {}).get("name")))
    baseline = {} if plugin is None else {"baseline": plugin.baseline}
    print("\n" + closing_summary(results, run_dir, **baseline), flush=True)


def run_header(cfg, run_dir: Path) -> str:
    """The run's first line: what runs, on what, and where its files go."""
    return (f"{cfg.algorithm.name} on {cfg.dataset.name} ({cfg.model.name}): {cfg.fleet.devices} devices, "
            f"{cfg.fleet.per_round} per round, {cfg.rounds} rounds, scenario {cfg.scenario.name}; files in {run_dir}")


def record_failed_job(run_dir: Path, error: Exception, multirun: bool) -> None:
    """Write ``error.json``; a single run exits non-zero, a sweep remembers the job and goes on."""
    path = write_error_record(run_dir, error)
    print(f"run failed ({type(error).__name__}: {error}); details in {path}", file=sys.stderr)
    if not multirun:
        sys.exit(RUN_FAILED_EXIT)
    _FAILED_JOBS.append(str(run_dir))


if __name__ == "__main__":
    main()
    exit_if_sweep_failed()
