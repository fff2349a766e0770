"""The process backend of the simulation engine: Flower's Backend contract on local workers."""

import multiprocessing
import os
import sys
import threading
import time

import pytest
import torch._dynamo  # noqa: F401  (each test's fork server inherits it instead of importing it: ~2 s)
from flwr.clientapp.client_app import ClientAppException
from flwr.server.superlink.fleet.vce.backend import Backend

from experiments.engine import forkserver as engine_forkserver
from experiments.engine import processes as ep


class EchoApp:
    """A picklable stand-in ClientApp: the reply names the worker; 'raise', 'exit', 'sleep' misbehave."""

    def __call__(self, message, context):
        if message == "raise":
            raise RuntimeError("the handler failed")
        if message == "exit":
            os._exit(75)
        if message == "sleep":
            time.sleep(600)
        if message == "parent":
            return "parent", os.getppid()
        if message == "matmul":  # enough work for torch to reach for its thread pool
            import torch

            a = torch.randn(1500, 1500)
            return "matmul", float((a @ a).abs().sum() > 0)
        context["seen"] = context.get("seen", 0) + 1  # a ClientApp updates its context in place
        return message, os.getpid()


def make_echo_app():
    return EchoApp()


@pytest.fixture
def backend():
    with ep.process_backend(make_echo_app, workers=2, fork_now=True):  # what a default run does
        flwr_backend = sys.modules[ep.RAY_BACKEND_MODULE].RayBackend({})  # what Flower's runtime builds
        flwr_backend.build(lambda: None)
        yield flwr_backend
        flwr_backend.terminate()
    assert ep.RAY_BACKEND_MODULE not in sys.modules or sys.modules[ep.RAY_BACKEND_MODULE].RayBackend is not ep.ProcessBackend


def broken_factory():
    raise OSError("no data here")


def test_a_worker_that_cannot_build_its_app_fails_every_message_by_name():
    with ep.process_backend(broken_factory, workers=1, fork_now=True) as pool:
        for _ in range(2):
            with pytest.raises(ClientAppException, match="could not start: OSError: no data here"):
                pool.run("hello", {})


def test_workers_answer_with_the_updated_context_and_keep_their_app(backend):
    assert isinstance(backend, Backend) and backend.num_workers == 2 and backend.is_worker_idle()
    (text, pid), context = backend.process_message("hello", {"seen": 1})
    assert text == "hello" and context == {"seen": 2} and pid != os.getpid()
    pids = {backend.process_message(str(i), {})[0][1] for i in range(6)}
    assert len(pids) <= 2  # two long-lived workers served every message


def test_an_app_error_comes_back_as_a_client_app_exception_and_the_worker_stays(backend):
    with pytest.raises(ClientAppException, match="the handler failed"):
        backend.process_message("raise", {})
    assert backend.process_message("ok", {})[0][0] == "ok"


def test_a_dead_worker_fails_its_message_and_is_replaced(backend):
    with pytest.raises(ClientAppException, match="exit code 75"):
        backend.process_message("exit", {})
    answers = [backend.process_message(str(i), {})[0][0] for i in range(4)]
    assert answers == ["0", "1", "2", "3"] and backend.num_workers == 2


def _slow_replacements(monkeypatch, delay_s):
    """Replacement workers take ``delay_s`` to start, as the first one waits for the fork server's imports."""
    started = ep.WorkerPool._new_worker

    def slow(pool):
        time.sleep(delay_s)
        return started(pool)

    monkeypatch.setattr(ep.WorkerPool, "_new_worker", slow)


def test_a_dead_worker_fails_its_message_before_its_replacement_is_up(monkeypatch):
    _slow_replacements(monkeypatch, 4.0)
    with ep.process_backend(make_echo_app, workers=2, fork_now=True) as pool:
        began = time.monotonic()
        with pytest.raises(ClientAppException, match="exit code 75"):
            pool.run("exit", {})
        assert time.monotonic() - began < 3.0  # not 4 s + the exit: the cloud hears "gone", not "late"
        assert pool.run("meanwhile", {})[0][0] == "meanwhile"  # the other worker serves
        deadline = time.monotonic() + 60
        while pool._idle.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool._idle.qsize() == 2  # the replacement joined


def test_a_replacement_that_starts_after_the_pool_closed_is_stopped(monkeypatch):
    _slow_replacements(monkeypatch, 1.0)
    before = {p.pid for p in multiprocessing.active_children()}
    with ep.process_backend(make_echo_app, workers=1, fork_now=True) as pool, pytest.raises(ClientAppException, match="exit code 75"):
        pool.run("exit", {})
    assert not pool._replacing and pool._idle.empty()
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert not [p for p in left if p.name == "edgecloud-clientapp"]


def test_stop_busy_ends_a_stalled_app_and_its_caller_gets_an_error(backend):
    errors = []

    def call():
        try:
            backend.process_message("sleep", {})
        except ClientAppException as exc:
            errors.append(str(exc))

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while not backend._pool._busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ep.stop_busy_workers() == 1
    caller.join(30)
    assert not caller.is_alive() and errors and "ended" in errors[0]
    assert backend.process_message("after", {})[0][0] == "after"


def test_the_backend_needs_its_block_and_a_worker_count():
    with pytest.raises(RuntimeError, match="process_backend"):
        ep.ProcessBackend({})
    with pytest.raises(ValueError, match="workers"):
        with ep.process_backend(make_echo_app, workers=0):
            pass
    assert ep.ProcessBackend.pool is None
    assert ep.workers_for(1.0, cpus=2) == 2 and ep.workers_for(2.0, cpus=2) == 1 and ep.workers_for(4.0, cpus=2) == 1
    with pytest.raises(ValueError, match="num_cpus"):
        ep.workers_for(0.0)


def test_auto_picks_processes_on_one_machine_and_ray_for_a_cluster_or_gpus():
    from experiments.config import from_dict, resolved_backend
    from experiments.schema import ConfigError, EngineConfig

    assert resolved_backend(EngineConfig()) == "processes"
    assert resolved_backend(EngineConfig(ray_address="auto")) == "ray"
    assert resolved_backend(EngineConfig(num_gpus=0.5)) == "ray"
    assert resolved_backend(EngineConfig(backend="ray")) == "ray"
    with pytest.raises(ConfigError, match="engine.backend=ray"):
        from_dict({"engine": {"backend": "processes", "ray_address": "auto"}})
    with pytest.raises(ConfigError, match="engine.backend must be one of"):
        from_dict({"engine": {"backend": "dask"}})


def test_workers_come_from_a_fork_server_forked_off_this_process_when_it_has_one_thread():
    with ep.process_backend(make_echo_app, workers=2, fork_now=True) as pool:
        assert pool.forked and engine_forkserver.running()  # pytest runs tests on its main thread alone
        server = multiprocessing.forkserver._forkserver._forkserver_pid
        (text, pid), _ = pool.run("hi", {})
        assert text == "hi" and pid != os.getpid()
        assert pool.run("parent", {})[0] == ("parent", server)  # a fork of the fork server ...
        assert _parent_of(server) == os.getpid()  # ... which is a fork of this process
        with pytest.raises(ClientAppException, match="exit code 75"):
            pool.run("exit", {})  # its replacement comes from the same server
        assert sorted(pool.run(str(i), {})[0][0] for i in range(3)) == ["0", "1", "2"]
        assert {pool.run("parent", {})[0][1] for _ in range(4)} == {server}
    assert not engine_forkserver.running() and not os.path.exists(f"/proc/{server}")  # ended and reaped


def _parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (Linux: field 4 of /proc/<pid>/stat, after the command name)."""
    stat = open(f"/proc/{pid}/stat").read()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_a_second_thread_makes_the_pool_use_the_fork_server():
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        assert not engine_forkserver.fork_is_safe()
        with ep.process_backend(make_echo_app, workers=1, fork_now=True) as pool:
            assert not pool.forked and pool.run("x", {})[0][0] == "x"
    finally:
        stop.set()
        helper.join()


def test_a_forked_worker_uses_torch_after_the_driver_ran_it_on_two_threads():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(1500, 1500)
        assert (a @ a).abs().sum() > 0  # the driver's OpenMP pool is up
        with ep.process_backend(make_echo_app, workers=1, fork_now=True) as pool:
            assert pool.forked
            outcome = []
            caller = threading.Thread(target=lambda: outcome.append(pool.run("matmul", {})[0]))
            caller.start()
            caller.join(60)  # a forked worker on its parent's OpenMP pool would hang here
            assert outcome == [("matmul", 1.0)]
    finally:
        torch.set_num_threads(threads)


def test_idle_forked_workers_stop_at_once_not_after_their_grace_period():
    with ep.process_backend(make_echo_app, workers=2, fork_now=True) as pool:
        assert pool.forked
        pool.run("hi", {})
        started = time.monotonic()
        pool.close()
        took = time.monotonic() - started
    assert took < ep.EXIT_GRACE_S  # a worker holding another's pipe open would cost each stop its grace period
