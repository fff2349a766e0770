"""Flower's simulation runtime on local worker processes instead of Ray, for ``experiments.engine.simulation``.

Flower 1.41's Simulation Engine runs ClientApps through a ``Backend``
(``flwr.server.superlink.fleet.vce.backend``: ``build``, ``num_workers``, ``is_worker_idle``,
``process_message``, ``terminate``) and always builds its ``RayBackend``. On one machine Ray
costs, measured on 2 cores (docs/PERFORMANCE.md): seconds of start-up (GCS, raylet, workers)
and the memory of its own processes. :class:`ProcessBackend` implements the same interface on
``multiprocessing``: one worker process per ClientApp slot, started by a fork server. With one
torch thread per worker that server is forked off the driver early
(:mod:`experiments.engine.forkserver`, started by ``experiments.run`` before its preflight), so
the workers start in milliseconds and share the driver's imported pages; otherwise it is
Python's own fork server, preloaded with :data:`~experiments.engine.worker.PRELOAD`. A message
and its ``Context`` travel to a worker and back pickled over a pipe.

Every worker builds the ClientApp once from a picklable factory (``build_client_app``
with the run's config) and keeps it, as a Ray actor keeps its imports and caches
(:func:`experiments.engine.worker.serve`). A worker whose ClientApp raises sends the error
back (Flower turns it into an error reply); a worker that dies (``os._exit``, a crash, the
watchdog) fails its message with ``ClientAppException`` at once and is replaced by a fresh one
started in the background, so one dead device never costs the fleet an executor.

:func:`process_backend` starts the workers and installs the backend for the duration of one
``run_simulation`` call (:func:`installed_backend`: Flower's ``vce_api.start_vce`` imports
``RayBackend`` from :data:`RAY_BACKEND_MODULE` when the runtime starts, so a stand-in module
there is what it builds); :func:`stop_busy_workers` is the watchdog's way to end ClientApps
that never return. The pool counts the messages it handled (:attr:`WorkerPool.handled`): that
count, not the configuration, is how a run knows the process backend really ran its ClientApps
(:mod:`experiments.engine.guards`).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from flwr.clientapp.client_app import ClientAppException
from flwr.server.superlink.fleet.vce.backend import Backend

from experiments.engine import forkserver as engine_forkserver
from experiments.engine.worker import PRELOAD, serve

logger = logging.getLogger(__name__)

#: Flower's module that holds ``RayBackend``; ``vce_api.start_vce`` imports the class from it.
RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"
#: How workers start: from a fork server (a clean single-threaded parent; forking the driver
#: once Flower's threads run is unsafe): the one forked off the driver, else Python's own.
START_METHOD = "forkserver"
#: Seconds a worker gets to exit after its pipe closes before it is killed.
EXIT_GRACE_S = 2.0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where unsupported)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def workers_for(num_cpus: float, cpus: int | None = None) -> int:
    """How many ClientApps run at once: ``cpus // num_cpus`` (>= 1), as Ray packs actors by CPUs."""
    if not num_cpus > 0:
        raise ValueError(f"num_cpus per ClientApp must be > 0, got {num_cpus}")
    return max(1, int((usable_cpus() if cpus is None else cpus) // num_cpus))


class _Worker:
    """One worker process and the backend's end of its pipe."""

    def __init__(self, ctx, factory: Callable[[], Any], initializer: Callable[[], None] | None,
                 forked: bool = False) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, factory, initializer, forked), daemon=True,
                                   name="edgecloud-clientapp")
        self.process.start()
        child.close()

    def stop(self) -> None:
        """Ask the worker to end, close the pipe, give it :data:`EXIT_GRACE_S`, then kill it.

        Closing the pipe alone ends a worker only when no other process holds the driver's
        end: workers forked straight from the driver held each other's (each stop then waited
        the whole grace period: 2 s a worker at the end of every run, measured).
        """
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        with contextlib.suppress(OSError):
            self.conn.close()
        self.process.join(EXIT_GRACE_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class WorkerPool:
    """Worker processes (one ClientApp each), started at once, with their idle queue.

    Workers, replacements included, come from a fork server. With ``fork_now`` (set by the
    caller when its workers run torch on one thread: a fork must not enter its parent's
    OpenMP pool) that is the server forked off this process (:mod:`experiments.engine.forkserver`,
    started here unless ``experiments.run`` started it already, when this process has one
    thread: :func:`~experiments.engine.forkserver.fork_is_safe`): the workers share this
    process's imported modules (torch alone is ~280 MB of private memory per process that
    imports it) and what the server imported and warmed. Otherwise it is Python's own fork server, preloaded with
    :data:`PRELOAD`. :meth:`close` ends the forked server with the workers.

    Parameters
    ----------
    factory : callable
        Picklable, no arguments, returns the ClientApp.
    workers : int
        How many processes.
    initializer : callable, optional
        Picklable; each worker calls it once when it starts (logging, warm caches).
    fork_now : bool
        Take the workers from a fork server forked off this process (see above).

    Attributes
    ----------
    handled : int
        Messages handed to a worker so far (whatever the ClientApp then did with them).
    """

    def __init__(self, factory: Callable[[], Any], workers: int, initializer: Callable[[], None] | None = None,
                 fork_now: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._factory, self._initializer, self.size = factory, initializer, workers
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._busy: set[_Worker] = set()
        self._replacing: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.closed = False
        self.handled = 0
        self.forked = fork_now and engine_forkserver.start(PRELOAD)
        self._context = multiprocessing.get_context(START_METHOD)
        self._context.set_forkserver_preload(list(PRELOAD))  # for Python's own server only
        for _ in range(workers):
            self._idle.put(self._new_worker())

    def _new_worker(self) -> _Worker:
        return _Worker(self._context, self._factory, self._initializer, self.forked)

    def has_idle(self) -> bool:
        """Whether a worker is free."""
        return not self._idle.empty()

    def run(self, message, context):
        """The ClientApp's reply to ``message`` from a free worker: ``(reply, updated context)``.

        Raises ``ClientAppException`` when the ClientApp raised or its process died (a new
        worker then takes its place, started in the background: :meth:`_bury`).
        """
        worker = self._idle.get()
        with self._lock:
            self._busy.add(worker)
            self.handled += 1
        alive = True
        try:
            worker.conn.send((message, context))
            outcome = worker.conn.recv()
        except (EOFError, OSError) as exc:
            alive = False
            code = self._bury(worker)
            raise ClientAppException(f"the ClientApp's worker process ended (exit code {code}) "
                                     "while handling the message") from exc
        finally:
            with self._lock:
                self._busy.discard(worker)
            if alive and not self.closed:
                self._idle.put(worker)
        if outcome[0] == "error":
            raise ClientAppException(outcome[1])
        return outcome[1], outcome[2]

    def _bury(self, worker: _Worker) -> int | None:
        """Reap a dead worker and start its replacement in the background; returns the exit code.

        The dead worker's message fails at once: a replacement can take seconds (the first one
        waits for the fork server to import :data:`PRELOAD`), longer than a round's timeout on
        a slow host, and the cloud must hear that the device is gone, not that it is late.
        """
        worker.process.join(EXIT_GRACE_S)
        code = worker.process.exitcode
        worker.stop()
        if not self.closed:
            replacing = threading.Thread(target=self._replace, name="edgecloud-worker-replacement", daemon=True)
            with self._lock:
                self._replacing.add(replacing)
            replacing.start()
        return code

    def _replace(self) -> None:
        """Start a new worker; it joins the idle queue unless the pool closed meanwhile."""
        worker = None
        try:
            worker = self._new_worker()
        except Exception:  # a pool one worker short still runs the fleet
            logger.exception("could not replace a dead ClientApp worker; the pool runs one worker short")
        finally:
            with self._lock:
                keep = worker is not None and not self.closed
                if keep:
                    self._idle.put(worker)
                self._replacing.discard(threading.current_thread())
        if worker is not None and not keep:
            worker.stop()

    def stop_busy(self) -> int:
        """Kill the workers still inside a ClientApp; returns how many (each is replaced)."""
        with self._lock:
            busy = list(self._busy)
        for worker in busy:
            worker.process.kill()
        return len(busy)

    def close(self) -> None:
        """Stop every worker (idle ones by closing their pipe, busy ones by a kill)."""
        with self._lock:
            self.closed = True
            replacing = list(self._replacing)
        self.stop_busy()
        for thread in replacing:  # a replacement that arrives now stops itself
            thread.join()
        while True:
            try:
                self._idle.get_nowait().stop()
            except queue.Empty:
                break
        if self.forked:
            engine_forkserver.stop()


class ProcessBackend(Backend):
    """Flower's simulation ``Backend`` on the :class:`WorkerPool` of :func:`process_backend` (module docstring).

    Flower constructs it with the run's JSON backend config and hands ``build`` an in-process
    ``app_fn``, neither of which can start a ClientApp in another process; the pool, started
    by :func:`process_backend` before Flower's runtime (so the workers warm up while the
    cloud starts), carries the picklable factory instead.
    """

    #: The pool of the running :func:`process_backend` block.
    pool: WorkerPool | None = None

    def __init__(self, backend_config: dict | None = None) -> None:  # noqa: ARG002  (Flower's signature)
        if ProcessBackend.pool is None:
            raise RuntimeError("ProcessBackend runs inside experiments.engine.processes.process_backend(...)")
        self._pool = ProcessBackend.pool

    def build(self, app_fn: Callable[[], Any]) -> None:  # noqa: ARG002  (the workers build their own ClientApp)
        """Nothing to do: the pool's workers started with :func:`process_backend`."""

    @property
    def num_workers(self) -> int:
        """ClientApps that run at once (one worker process each)."""
        return self._pool.size

    def is_worker_idle(self) -> bool:
        """Whether a worker is free."""
        return self._pool.has_idle()

    def process_message(self, message, context):
        """Run the ClientApp on ``message`` in a free worker (:meth:`WorkerPool.run`); Flower turns an
        exception into an error reply."""
        return self._pool.run(message, context)

    def terminate(self) -> None:
        """Stop the workers (Flower calls this when the simulation ends)."""
        self._pool.close()


def stop_busy_workers() -> int:
    """Kill the running simulation's workers that are inside a ClientApp (0 when none runs)."""
    pool = ProcessBackend.pool
    return 0 if pool is None else pool.stop_busy()


@contextlib.contextmanager
def installed_backend(backend_class: type[Backend]) -> Iterator[None]:
    """Inside the block, Flower's simulation runtime builds ``backend_class`` where it builds ``RayBackend``.

    Flower 1.41's ``vce_api.start_vce`` runs ``from .backend.raybackend import RayBackend``
    each time the runtime starts; a stand-in module under :data:`RAY_BACKEND_MODULE` in
    ``sys.modules`` answers that import. The module that was there (or none) is restored on exit.
    tests/test_engine_guards.py checks that Flower still builds its backend this way.
    """
    stand_in = types.ModuleType(RAY_BACKEND_MODULE)
    stand_in.RayBackend = backend_class
    saved = sys.modules.get(RAY_BACKEND_MODULE)
    sys.modules[RAY_BACKEND_MODULE] = stand_in
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(RAY_BACKEND_MODULE, None)
        else:
            sys.modules[RAY_BACKEND_MODULE] = saved


@contextlib.contextmanager
def process_backend(factory: Callable[[], Any], workers: int, initializer: Callable[[], None] | None = None,
                    fork_now: bool = False) -> Iterator[WorkerPool]:
    """Inside the block, Flower's simulation runtime runs ClientApps on :class:`ProcessBackend`.

    The workers start on entry and stop on exit, whatever happened inside. Arguments are
    those of :class:`WorkerPool`.
    """
    pool = WorkerPool(factory, workers, initializer, fork_now)
    ProcessBackend.pool = pool
    try:
        with installed_backend(ProcessBackend):
            yield pool
    finally:
        ProcessBackend.pool = None
        pool.close()
