"""The engine's hold on Flower's simulation runtime, checked while a run runs.

The engine changes two things inside Flower 1.41's runtime (docs/ENGINE.md): the backend it
builds (:func:`experiments.engine.processes.installed_backend`) and the message pump it starts
(:func:`experiments.engine.fastpath.faster_message_pump`). Neither is a Flower API: a Flower
release may build its backend or start its pump another way, and a run would then go on, on
Flower's own, without a word. :class:`EngineWitness` watches what really happened: the process
backend's pool counts the messages it handled, the pump sets an event when Flower calls it, and
Ray runs in this process only once Flower's Ray backend has started it. After the fleet's
warm-up, the run's first messages, :meth:`EngineWitness.check` raises :class:`EngineBypassed`,
naming what changed and the fix, if Flower went around what the engine installed;
:meth:`EngineWitness.record` writes the backend that ran the ClientApps into ``results.json``
as ``summary.engine_backend``.

Flower 1.41 also logs that ``run_simulation``, the engine's entry point, is deprecated, and
asks its caller to move to ``flwr run``. That caller is the engine, not the user:
:class:`DeprecationNotice` turns Flower's notice into the engine's own, once per process, which
says what is pinned and where the plan is (docs/ENGINE.md).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.engine.processes import RAY_BACKEND_MODULE, WorkerPool
from experiments.results.writer import RESULTS_FILENAME, add_to_summary

logger = logging.getLogger(__name__)

#: The Flower release whose internals the engine relies on (pyproject.toml pins it).
PINNED_FLOWER = "flwr==1.41.0"
#: The backends a run can record: the engine's process backend, Flower's Ray backend, or
#: neither seen to handle a message.
PROCESSES, RAY, UNKNOWN = "processes", "ray", "unknown"
#: The results.json summary key of the backend that ran the ClientApps.
ENGINE_BACKEND_KEY = "engine_backend"
#: Flower's logger, and the words of Flower 1.41's deprecation notice for ``run_simulation``.
FLOWER_LOGGER = "flwr"
FLOWER_DEPRECATION_MARK = "The `run_simulation` function is deprecated"
#: What the engine says instead (once per process).
ENGINE_NOTICE = (f"Flower deprecates run_simulation, the entry point of this engine's simulations; the project "
                 f"pins {PINNED_FLOWER}, and docs/ENGINE.md says what the engine switches to once Flower removes it")
BACKEND_BYPASSED = (
    "Flower {version} ran this run's ClientApps on {ran_on} instead of the engine's process backend. The engine "
    "installs that backend where Flower 1.41's vce_api.start_vce imports RayBackend when the runtime starts "
    f"({RAY_BACKEND_MODULE}); this Flower builds its backend another way. Fix: install {PINNED_FLOWER} "
    "(pyproject.toml pins it), or run on Flower's Ray backend with engine.backend=ray; "
    "tests/test_engine_guards.py names the internal that changed")
PUMP_BYPASSED = (
    "Flower {version} never called the engine's message pump. The engine replaces vce_api.add_messages_to_queue, "
    "which Flower 1.41's run_api looks up when it starts its pump thread; this Flower pumps messages another way. "
    f"Fix: install {PINNED_FLOWER} (pyproject.toml pins it), or use Flower's own pump with engine.fast_pump=false; "
    "tests/test_engine_guards.py names the internal that changed")


class EngineBypassed(RuntimeError):
    """Flower ran a simulation around what the engine installed in its runtime (see the module docstring)."""


def flower_version() -> str:
    """The installed Flower release, as its package metadata states it."""
    return importlib.metadata.version("flwr")


def ray_is_up() -> bool:
    """Whether Ray runs in this process (without importing Ray: a process that never imported it has none).

    In a simulation only Flower's Ray backend starts Ray, and it is up from the backend's
    construction until the runtime ends.
    """
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class EngineWitness:
    """What ran a run's ClientApps and pumped its messages, as observed while the run runs.

    Parameters
    ----------
    backend : str
        The backend the engine installed: ``"processes"`` or ``"ray"`` (``engine.backend`` resolved).
    pool : WorkerPool, optional
        The process backend's pool; None on Ray.
    pump_called : threading.Event, optional
        Set once Flower called the engine's pump; None when the run uses Flower's own pump.
    ray_up : callable
        Whether Ray runs in this process (:func:`ray_is_up`).
    """

    def __init__(self, backend: str, pool: WorkerPool | None = None, pump_called: threading.Event | None = None,
                 ray_up: Callable[[], bool] = ray_is_up) -> None:
        self.backend, self._pool, self._pump_called, self._ray_up = backend, pool, pump_called, ray_up

    def ran_on(self) -> str:
        """The backend that handled the run's messages so far: ``"processes"``, ``"ray"`` or ``"unknown"``."""
        if self._pool is not None and self._pool.handled:
            return PROCESSES
        return RAY if self._ray_up() else UNKNOWN

    def check(self, replies: Sequence[Any]) -> None:
        """Raise :class:`EngineBypassed` if Flower went around the installed backend or pump.

        ``replies`` are the fleet's answers to the warm-up. Only a reply with content proves that
        a ClientApp ran (an error reply may come from Flower's link state alone); without one
        there is nothing to check yet, and the cloud's discovery fails by name.
        """
        if not any(reply.has_content() for reply in replies):
            return
        ran_on = self.ran_on()
        if self.backend == PROCESSES and ran_on != PROCESSES:
            where = "Ray" if ran_on == RAY else "a backend the engine cannot see"
            raise EngineBypassed(BACKEND_BYPASSED.format(version=flower_version(), ran_on=where))
        if self._pump_called is not None and not self._pump_called.is_set():
            raise EngineBypassed(PUMP_BYPASSED.format(version=flower_version()))

    def record(self, run_dir: str | Path) -> None:
        """Write ``summary.engine_backend`` into ``run_dir``'s results.json (nothing when there is none).

        Called once the ServerApp has finished, while the runtime is still up. Never raises: it
        runs while a failed run's error propagates, and a missing record must not hide that error.
        """
        path = Path(run_dir) / RESULTS_FILENAME
        if not path.is_file():
            return
        try:
            add_to_summary(path, {ENGINE_BACKEND_KEY: self.ran_on()})
        except (OSError, ValueError) as exc:
            logger.warning("could not record the engine backend in %s: %s", path, exc)


class DeprecationNotice(logging.Filter):
    """Turns Flower's deprecation notice for ``run_simulation`` into :data:`ENGINE_NOTICE`, once per process.

    A user cannot act on it (the project pins Flower), so it reaches the terminal only with
    ``engine.verbose``; otherwise it goes to this module's logger at DEBUG.
    """

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.told = False
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102  (logging.Filter API)
        if FLOWER_DEPRECATION_MARK not in record.getMessage():
            return True
        if self.told:
            return False
        self.told = True
        if not self.verbose:
            logger.debug(ENGINE_NOTICE)
            return False
        record.msg, record.args = ENGINE_NOTICE, ()
        return True


def notice_deprecation(verbose: bool = False) -> DeprecationNotice:
    """Install :class:`DeprecationNotice` on Flower's logger (once); returns the installed filter."""
    flwr_logger = logging.getLogger(FLOWER_LOGGER)
    for existing in flwr_logger.filters:
        if isinstance(existing, DeprecationNotice):
            existing.verbose = verbose
            return existing
    notice = DeprecationNotice(verbose)
    flwr_logger.addFilter(notice)
    return notice
