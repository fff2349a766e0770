"""A fork server forked from the driver, started early, for :mod:`experiments.engine.processes`.

The process backend's workers must share the driver's imported pages (torch alone is ~280 MB
of private memory per process that imports it) and must not be forked once Flower's threads
run. Forking them from the driver itself would put everything they need on the driver's
path: torch's compiler stack, which the first optimizer imports (1.7-2.5 s measured), then the
data and FLOP-count caches, and only then Flower's start.

This module forks a *fork server* off the driver as soon as the run's configuration is known,
while the driver is still single-threaded: it shares every page the driver has imported so
far, imports the rest (:data:`experiments.engine.worker.PRELOAD`), fills the run's caches and
then serves worker requests. Meanwhile the driver, on the other core, imports Flower's runtime
and checks the data. Workers then come from it exactly as from Python's own fork server
(``multiprocessing`` context ``forkserver``: ``Process.start``, ``join``, ``kill`` and exit
codes all work), so they share the server's pages too, and a replacement for a dead worker
starts in milliseconds instead of a fresh interpreter's seconds.

It plugs into the standard library's fork server by starting it the way
``multiprocessing.forkserver.ForkServer.ensure_running`` does, with ``os.fork`` in place of
spawning a new interpreter, and filling in the same fields. Python versions whose fork server
has another shape (3.13 added an authentication key) get ``False`` from :func:`start`, and the
backend uses the standard fork server instead.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection, forkserver, util

import torch

logger = logging.getLogger(__name__)

#: The parameters of ``multiprocessing.forkserver.main`` this module knows how to call (Python 3.11-3.12).
KNOWN_MAIN_PARAMETERS = ("listener_fd", "alive_r", "preload", "main_path", "sys_path")
#: Seconds the server gets to exit after its alive pipe closes before it is killed.
STOP_GRACE_S = 2.0
#: How often :func:`stop` looks whether the server has exited (seconds).
STOP_POLL_S = 0.01

_started_pid: int | None = None  # the fork server this module started (None: none running)
_retired: list[int] = []  # Python's own fork servers this module retired, not reaped yet


def fork_is_safe() -> bool:
    """Whether this process may fork: POSIX fork, and no thread but this one (Flower's have not started)."""
    return hasattr(os, "fork") and threading.active_count() == 1


def supported() -> bool:
    """Whether this Python's fork server is the shape this module starts (see the module docstring)."""
    server = forkserver._forkserver
    fields = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_lock")
    known = tuple(inspect.signature(forkserver.main).parameters) == KNOWN_MAIN_PARAMETERS
    return known and all(hasattr(server, f) for f in fields) and not hasattr(server, "_forkserver_authkey")


def running() -> bool:
    """Whether the fork server this module started is up (the backend's workers come from it)."""
    if _started_pid is None:
        return False
    if forkserver._forkserver._forkserver_pid != _started_pid:  # multiprocessing replaced it
        _forget(close_alive=False)
        return False
    try:
        exited = os.waitpid(_started_pid, os.WNOHANG)[0] != 0
    except ChildProcessError:  # reaped elsewhere (multiprocessing's own check)
        exited = True
    if exited:  # forget it: multiprocessing starts its standard server when next asked
        _forget(close_alive=True)
    return not exited


def start(preload: Sequence[str], warm: Callable[[], None] | None = None) -> bool:
    """Fork the fork server off this process; returns whether it runs (see :func:`supported`, :func:`fork_is_safe`).

    Parameters
    ----------
    preload : sequence of str
        Modules the server imports before it serves (workers inherit them).
    warm : callable, optional
        Called in the server after the imports (fill caches the workers inherit); an
        exception there is logged and the server serves anyway (each worker then meets
        the same error when it starts and reports it with its first message).
    """
    global _started_pid
    if running():
        return True
    if not (supported() and fork_is_safe()):
        return False
    server = forkserver._forkserver
    _retire_standard_server(server)
    with socket.socket(socket.AF_UNIX) as listener:  # as ForkServer.ensure_running sets it up
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()  # every client holds alive_w: EOF on alive_r ends the server
        pid = os.fork()  # no lock held: the child must not inherit a taken one
        if pid == 0:
            _serve_forever(listener.fileno(), alive_r, alive_w, list(preload), warm)
        os.close(alive_r)
    with server._lock:
        server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
    _started_pid = pid
    return True


def _retire_standard_server(server) -> None:
    """Let Python's own fork server, if one runs, end once its live children have (it reports
    their exit codes until then), and reap the ones retired earlier; the singleton is ours next."""
    for pid in list(_retired):
        with contextlib.suppress(ChildProcessError):
            if not os.waitpid(pid, os.WNOHANG)[0]:
                continue
        _retired.remove(pid)
    if server._forkserver_pid is None:
        return
    with contextlib.suppress(OSError):
        os.close(server._forkserver_alive_fd)
    _retired.append(server._forkserver_pid)
    server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None


def _serve_forever(listener_fd: int, alive_r: int, alive_w: int, preload: list[str],
                   warm: Callable[[], None] | None) -> None:
    """The server's side: never returns into the driver's code (``os._exit`` whatever happens)."""
    code = 0
    try:
        os.close(alive_w)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's; the alive pipe ends us
        torch.set_num_threads(1)  # a fork must not enter the parent's OpenMP pool: one thread before any torch work
        for module in preload:
            __import__(module)
        if warm is not None:
            try:
                warm()
            except Exception:  # the workers report it (see start())
                logger.debug("the fork server could not warm its caches", exc_info=True)
        forkserver.main(listener_fd, alive_r, preload)
    except SystemExit:  # forkserver.main's way to end once every client has gone
        pass
    except BaseException:  # noqa: BLE001  (nothing may unwind into the driver's frames)
        code = 1
    finally:
        os._exit(code)


def stop() -> None:
    """End the fork server this module started (its workers have stopped); nothing if none runs."""
    if not running():
        return
    pid = _started_pid
    _forget(close_alive=True)  # the server ends once no client holds the alive pipe
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(STOP_POLL_S)
    logger.warning("the ClientApp fork server had not ended %.0f s after the run; killed it", STOP_GRACE_S)
    os.kill(pid, signal.SIGKILL)  # a worker still holds the alive pipe: the server would outlive the run
    os.waitpid(pid, 0)


def _forget(close_alive: bool) -> None:
    """Clear what :func:`start` filled in (closing the driver's end of the alive pipe if asked)."""
    global _started_pid
    server = forkserver._forkserver
    if _started_pid is not None and server._forkserver_pid == _started_pid:
        if close_alive:
            with contextlib.suppress(OSError):
                os.close(server._forkserver_alive_fd)
        server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None
    _started_pid = None
