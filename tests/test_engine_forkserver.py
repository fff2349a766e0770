"""The fork server forked off the driver: what the workers inherit, and when it is not used."""

import multiprocessing
import os
import sys
import time

import pytest
import torch._dynamo  # noqa: F401  (each test's fork server inherits it instead of importing it: ~2 s)

from experiments.config import compose
from experiments.engine import forkserver as engine_forkserver
from experiments.engine import processes as ep
from experiments.engine.worker import PRELOAD, forks_workers, start_worker_server
from experiments.schema import EngineConfig

WARMED: list[str] = []  # what the server's warm-up did (the driver's copy stays empty)
MARK = "imported"  # the test sets it at run time: a worker sees the new value only as a fork of this process


class StateApp:
    """Replies with this module's ``WARMED`` and ``MARK`` as the worker sees them, and its parent pid."""

    def __call__(self, message, context):
        module = sys.modules[__name__]
        return list(module.WARMED), module.MARK, os.getppid()


def make_state_app():
    return StateApp()


def warm_up():
    WARMED.append("warm")


def failing_warm_up():
    raise OSError("no cache here")


@pytest.fixture(autouse=True)
def no_server_left():
    yield
    engine_forkserver.stop()
    assert not engine_forkserver.running()


def server_pid() -> int | None:
    return multiprocessing.forkserver._forkserver._forkserver_pid


def test_workers_inherit_the_drivers_memory_and_the_servers_warm_up(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MARK", "set at run time")
    assert engine_forkserver.start(PRELOAD, warm=warm_up)
    started = server_pid()
    with ep.process_backend(make_state_app, workers=2, fork_now=True) as pool:
        assert pool.forked and server_pid() == started  # the pool took the early server, not a new one
        warmed, mark, parent = pool.run("state", {})[0]
    assert (warmed, mark, parent) == (["warm"], "set at run time", started)
    assert WARMED == []  # the warm-up ran in the server, not here
    assert server_pid() is None  # the pool's close ended it


def test_starting_twice_keeps_one_server_and_stopping_twice_is_harmless():
    assert engine_forkserver.start(PRELOAD)
    first = server_pid()
    assert engine_forkserver.start(PRELOAD) and server_pid() == first
    engine_forkserver.stop()
    engine_forkserver.stop()
    assert server_pid() is None and not os.path.exists(f"/proc/{first}")


def test_a_warm_up_that_fails_leaves_a_server_that_serves():
    assert engine_forkserver.start(PRELOAD, warm=failing_warm_up)
    with ep.process_backend(make_state_app, workers=1, fork_now=True) as pool:
        assert pool.run("state", {})[0][0] == []


def test_pythons_own_fork_server_is_retired_for_a_forked_one():
    with ep.process_backend(make_state_app, workers=1) as standard:
        own = server_pid()
        assert not standard.forked and own is not None
    with ep.process_backend(make_state_app, workers=1, fork_now=True) as pool:
        assert pool.forked and server_pid() != own and pool.run("state", {})[0][2] == server_pid()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{own}") and time.monotonic() < deadline:
        engine_forkserver.start(PRELOAD)  # each start reaps the servers retired earlier
        engine_forkserver.stop()
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{own}")  # it ended once its last child had, and was reaped


def test_a_fork_server_of_another_shape_falls_back_to_pythons_own(monkeypatch):
    monkeypatch.setattr(multiprocessing.forkserver._forkserver, "_forkserver_authkey", b"", raising=False)
    assert not engine_forkserver.supported() and not engine_forkserver.start(PRELOAD)
    with ep.process_backend(make_state_app, workers=1, fork_now=True) as pool:
        assert not pool.forked and pool.run("state", {})[0][1] == "imported"  # a fresh interpreter's import


def test_this_python_is_supported():
    assert engine_forkserver.supported()  # otherwise every run silently takes the slower path


def test_only_one_thread_process_backend_runs_fork_their_workers():
    assert forks_workers(EngineConfig()) and forks_workers(EngineConfig(backend="processes"))
    assert not forks_workers(EngineConfig(torch_threads=2))  # a fork must not enter the parent's OpenMP pool
    assert not forks_workers(EngineConfig(backend="ray")) and not forks_workers(EngineConfig(num_gpus=0.5))
    assert not start_worker_server(compose(["engine.backend=ray"])) and not engine_forkserver.running()
