"""The only module that touches Flower's simulation API (Flower's API churns: one file absorbs it).

``simulate(cfg, run_dir)`` runs the ServerApp and ClientApp of this project on Flower's
Ray-backed simulation engine: a local Ray by default, or an existing Ray cluster when
``engine.ray_address`` is set (``auto`` after ``ray start --head``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import experiments  # noqa: F401  (offline switches before Flower/Ray import)
from experiments.client_app import build_client_app
from experiments.config import RunConfig
from experiments.server_app import build_server_app

#: Flower's own deprecation notice for run_simulation; the engine is the one place that
#: knows, so users are not told to change code they did not write.
_DEPRECATION_MARK = "run_simulation"


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _DEPRECATION_MARK not in record.getMessage()


def quiet_flower_logs(verbose: bool) -> None:
    """Flower logs once (no propagation to Hydra's root handler), at WARNING unless verbose."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not any(isinstance(f, _DropDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropDeprecation())


def backend_config(cfg: RunConfig) -> dict:
    """Flower's Ray backend config: resources per ClientApp and how to reach Ray."""
    engine = cfg.engine
    init_args: dict = {"address": engine.ray_address} if engine.ray_address else {}
    return {
        "client_resources": {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus},
        "init_args": init_args,
    }


def simulate(cfg: RunConfig, run_dir: Path) -> None:
    """Run one simulation of ``cfg``; results land in ``run_dir``; errors propagate."""
    from flwr.simulation import run_simulation

    quiet_flower_logs(cfg.engine.verbose)
    run_simulation(
        server_app=build_server_app(cfg, Path(run_dir)),
        client_app=build_client_app(cfg, Path(run_dir)),
        num_supernodes=cfg.fleet.devices,
        backend_config=backend_config(cfg),
        verbose_logging=cfg.engine.verbose,
    )
