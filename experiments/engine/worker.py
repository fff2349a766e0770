"""What runs inside a process-backend worker, and the start of the fork server the workers come from.

Kept apart from :mod:`experiments.engine.processes` (which subclasses Flower's simulation
``Backend`` and so imports Flower's whole server runtime, 1.3 s and SQLAlchemy): a worker
imports only this module, the ClientApp's modules and torch's compiler stack (:data:`PRELOAD`).
"""

from __future__ import annotations

import functools
import logging
import signal
import traceback
from collections.abc import Callable
from typing import Any

import torch

from experiments.client_app import warm_process
from experiments.config import resolved_backend
from experiments.engine import forkserver as engine_forkserver
from experiments.schema import EngineConfig, RunConfig

#: Modules the fork server imports before it serves: the ClientApp and what it uses (torch,
#: flwr, the project), this worker loop, and what a device's first messages import lazily:
#: torch's compiler stack (the FLOP counter and the first optimizer load it; 1.7-2.5 s).
#: Workers inherit them, sharing their pages (importing torch._dynamo in each worker instead is
#: slower and costs 0.25 GiB more PSS, measured). scikit-learn and the partitioners are not
#: imported at all on a run whose partitions are cached (experiments/data/partition_cache.py).
PRELOAD = ("experiments.client_app", "experiments.engine.worker", "torch._dynamo")


def quiet_flower_logs(verbose: bool) -> None:
    """Flower logs once (no propagation to Hydra's root handler), at WARNING unless verbose."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def prepare_worker(cfg: RunConfig) -> None:
    """What a process-backend worker does when it starts: its torch threads, Flower's log level, warm caches."""
    torch.set_num_threads(cfg.engine.torch_threads)
    quiet_flower_logs(cfg.engine.verbose)
    warm_process(cfg)


def forks_workers(engine: EngineConfig) -> bool:
    """Whether the run's workers come from a fork server forked off the driver (:mod:`experiments.engine.forkserver`).

    Only on the process backend with one torch thread per worker: a forked child must not
    enter its parent's OpenMP pool, and one thread is what keeps it out.
    """
    return resolved_backend(engine) == "processes" and engine.torch_threads == 1


def start_worker_server(cfg: RunConfig) -> bool:
    """Fork the run's fork server now, before the driver's preflight; returns whether it runs.

    It imports :data:`PRELOAD` and warms the run's caches (:func:`prepare_worker`) on the
    other core while the driver goes on; :func:`engine_forkserver.stop` ends it.
    """
    if not forks_workers(cfg.engine):
        return False
    return engine_forkserver.start(PRELOAD, warm=functools.partial(prepare_worker, cfg))


def serve(conn, factory: Callable[[], Any], initializer: Callable[[], None] | None, forked: bool) -> None:
    """A worker's loop: ``(message, context)`` in, ``("ok", reply, context)`` or ``("error", text)`` out.

    The worker runs ``initializer`` and builds its ClientApp as soon as it starts (before its
    first message arrives); a failure there is reported on every message. Ctrl-C reaches the
    whole process group: the worker ignores it and the driver, which owns the run, stops it.
    A worker ``forked`` from a fork server that shares the driver's memory takes one torch
    thread before anything else: an OpenMP pool it inherited has no threads in the child, and
    entering it hangs the worker (measured: the FLOP count of ElasticDNN's master hung every
    worker forked after the driver built the network). ``None`` ends the loop.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if forked:
        torch.set_num_threads(1)
    app, failure = None, None
    try:
        if initializer is not None:
            initializer()
        app = factory()
    except Exception as exc:  # noqa: BLE001  (reported with the first message)
        failure = f"the ClientApp worker could not start: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the backend is gone
            return
        if job is None:
            return
        message, context = job
        if failure is not None:
            conn.send(("error", failure))
            continue
        try:
            reply = app(message=message, context=context)
            conn.send(("ok", reply, context))
        except Exception as exc:  # noqa: BLE001  (every ClientApp error goes back as a reply)
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
