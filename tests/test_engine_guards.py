"""The engine's hold on Flower and Ray, guarded: seconds each, no simulation, no Ray started.

The first tests drive the very Flower and Ray internals the engine relies on (docs/ENGINE.md
lists them) and fail, naming the internal, when an upgrade changes one; every wait has a
bound, so a changed internal fails the test rather than hanging it. The rest check what a run
does with what it observed: which backend it records in results.json, and the error it stops
with when Flower went around the engine's backend or message pump.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import sys
import threading

import pytest
import ray
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import Backend
from flwr.server.superlink.fleet.vce.metrics import VceMetrics
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.simulation import run_simulation as flower_run_simulation
from flwr.simulation.ray_transport.ray_actor import ClientAppActor
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from ray._private import state as ray_state
from ray._private import worker as ray_worker
from ray._private.utils import validate_actor_state_name
from ray._raylet import CoreWorker
from ray.core.generated import gcs_pb2
from ray.runtime_context import RuntimeContext

from experiments.engine import guards, watchdog
from experiments.engine.fastpath import faster_message_pump
from experiments.engine.guards import (
    ENGINE_NOTICE,
    FLOWER_DEPRECATION_MARK,
    DeprecationNotice,
    EngineBypassed,
    EngineWitness,
    notice_deprecation,
)
from experiments.engine.processes import RAY_BACKEND_MODULE, ProcessBackend, installed_backend
from experiments.engine.simulation import run_apps
from experiments.results.writer import ResultsWriter, load_results

#: Longest wait for Flower's runtime to call the engine's pump, or to stop (Flower's own
#: threads poll every 1 s; ten times that is a runtime that will not come).
FLOWER_WAIT_S = 10.0
#: Flower 1.41's simulation Backend interface: abstract methods and their parameters.
BACKEND_METHODS = {
    "build": ("self", "app_fn"),
    "is_worker_idle": ("self",),
    "process_message": ("self", "message", "context"),
    "terminate": ("self",),
}


def _state_factory() -> LinkStateFactory:
    """An in-memory link state factory, as Flower's run_simulation makes one."""
    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())


class IdleBackend(Backend):
    """A Backend with no workers: Flower's runtime starts and stops around it without running a ClientApp."""

    def __init__(self, backend_config=None) -> None:  # noqa: D107
        super().__init__(backend_config or {})
        self.config = backend_config

    def build(self, app_fn) -> None:  # noqa: D102
        pass

    def is_worker_idle(self) -> bool:  # noqa: D102
        return True

    def process_message(self, message, context):  # noqa: D102
        raise AssertionError("no message reaches a backend without workers")

    def terminate(self) -> None:  # noqa: D102
        pass


# --------------------------------------------------------------------------- Flower internals
def test_start_vce_builds_its_backend_from_the_module_the_engine_patches(monkeypatch):
    def refuse(self, backend_config):
        pytest.fail(f"vce_api.start_vce built Flower's own RayBackend while {RAY_BACKEND_MODULE} held the engine's "
                    "stand-in: Flower no longer imports RayBackend from that module when the runtime starts")

    flower_ray_backend = importlib.import_module(RAY_BACKEND_MODULE)
    monkeypatch.setattr(flower_ray_backend.RayBackend, "__init__", refuse)  # never start Ray here
    built = []

    def run_api(*args, **kwargs):  # Flower 1.41 passes (app_fn, backend_fn, ...) by position
        built.append((kwargs.get("backend_fn") or args[1])())

    monkeypatch.setattr(vce_api, "run_api", run_api)
    stop = threading.Event()
    stop.set()  # should Flower run its own runtime loop after all, it ends at once
    with installed_backend(IdleBackend):
        try:
            vce_api.start_vce(backend_name="ray", backend_config_json_stream='{"init_args": {"x": 1}}', app_dir="",
                              is_app=False, f_stop=stop, run=Run.create_empty(run_id=1), metrics=VceMetrics(),
                              client_app=ClientApp(), num_supernodes=2)
        except TypeError as exc:
            pytest.fail(f"vce_api.start_vce no longer takes the arguments Flower 1.41's run_simulation passes: {exc}")
    assert built, "vce_api.start_vce no longer hands its backend factory to vce_api.run_api"
    assert isinstance(built[0], IdleBackend) and built[0].config == {"init_args": {"x": 1}}, (
        f"vce_api.start_vce built {type(built[0]).__name__}, not the class under {RAY_BACKEND_MODULE}.RayBackend")
    assert sys.modules.get(RAY_BACKEND_MODULE) is flower_ray_backend  # the engine's stand-in is gone again


def test_run_api_starts_the_message_pump_the_engine_installs():
    stop = threading.Event()
    with faster_message_pump() as called:
        runtime = threading.Thread(target=vce_api.run_api, daemon=True, kwargs={
            "app_fn": ClientApp, "backend_fn": IdleBackend, "nodes_mapping": {}, "state_factory": _state_factory(),
            "node_info_stores": {}, "f_stop": stop, "metrics": VceMetrics()})
        runtime.start()
        pumped = called.wait(FLOWER_WAIT_S)
        stop.set()
        runtime.join(FLOWER_WAIT_S)
    assert pumped, ("vce_api.run_api did not call vce_api.add_messages_to_queue as it stands when the runtime starts: "
                    "Flower no longer looks its message pump up at call time")
    assert not runtime.is_alive(), "vce_api.run_api did not stop when its f_stop event was set"


def test_process_backend_has_the_signatures_of_flowers_backend_interface():
    assert Backend.__abstractmethods__ == frozenset(BACKEND_METHODS), (
        f"Flower's Backend now asks for {sorted(Backend.__abstractmethods__)}; ProcessBackend implements "
        f"{sorted(BACKEND_METHODS)}")
    assert not ProcessBackend.__abstractmethods__
    for name, parameters in BACKEND_METHODS.items():
        flower = tuple(inspect.signature(getattr(Backend, name)).parameters)
        assert flower == parameters, f"Flower's Backend.{name} now takes {flower}, ProcessBackend's takes {parameters}"
        assert tuple(inspect.signature(getattr(ProcessBackend, name)).parameters) == parameters
    for cls in (Backend, ProcessBackend):
        assert isinstance(inspect.getattr_static(cls, "num_workers"), property), f"{cls.__name__}.num_workers"
        assert tuple(inspect.signature(cls.__init__).parameters) == ("self", "backend_config"), f"{cls.__name__}()"


@pytest.fixture
def flower_warnings():
    """The messages Flower's logger emits at WARNING, with no notice filter installed beforehand."""
    flwr_logger, seen = logging.getLogger(guards.FLOWER_LOGGER), []
    filters, level = list(flwr_logger.filters), flwr_logger.level
    flwr_logger.filters[:] = [f for f in filters if not isinstance(f, DeprecationNotice)]
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    flwr_logger.addHandler(handler)
    flwr_logger.setLevel(logging.WARNING)  # Flower's notice is a WARNING
    yield seen
    flwr_logger.setLevel(level)
    flwr_logger.removeHandler(handler)
    flwr_logger.filters[:] = filters


def test_run_simulation_takes_what_run_apps_passes_and_its_deprecation_is_told_once(monkeypatch, flower_warnings):
    flower_module = sys.modules[flower_run_simulation.__module__]
    assert hasattr(flower_module, "_run_simulation"), "flwr.simulation.run_simulation no longer runs _run_simulation"
    calls = []
    monkeypatch.setattr(flower_module, "_run_simulation", lambda **kwargs: calls.append(kwargs))
    for _ in range(2):
        run_apps("server", "client", num_supernodes=3, backend={"init_args": {}}, verbose=True)
    assert [(c["server_app"], c["client_app"], c["num_supernodes"], c["backend_name"]) for c in calls] == [
        ("server", "client", 3, "ray")] * 2  # "ray": start_vce builds the class the engine installs
    told = [m for m in flower_warnings if "run_simulation" in m]
    assert told == [ENGINE_NOTICE]  # Flower told twice, the engine passed it on once


def test_without_verbose_the_deprecation_stays_out_of_the_terminal(monkeypatch, flower_warnings, caplog):
    flower_module = sys.modules[flower_run_simulation.__module__]
    monkeypatch.setattr(flower_module, "_run_simulation", lambda **kwargs: None)
    with caplog.at_level(logging.DEBUG, logger=guards.__name__):
        for _ in range(2):
            run_apps("server", "client", num_supernodes=3, backend={"init_args": {}}, verbose=False)
    assert [m for m in flower_warnings if "run_simulation" in m] == []
    assert [r.getMessage() for r in caplog.records if r.name == guards.__name__] == [ENGINE_NOTICE]


# --------------------------------------------------------------------------- Ray internals (the watchdog's)
def test_the_ray_calls_of_the_watchdog_exist_with_the_signatures_it_uses():
    parameters = inspect.signature(ray_state.actors).parameters
    assert {"job_id", "actor_state_name"} <= set(parameters), f"ray._private.state.actors now takes {list(parameters)}"
    validate_actor_state_name(watchdog.ALIVE)  # raises if Ray renamed the state
    info = ray_state.GlobalState()._gen_actor_info(gcs_pb2.ActorTableData(class_name=watchdog.CLIENT_ACTOR_CLASS))
    assert info.get("ActorClassName") == watchdog.CLIENT_ACTOR_CLASS, "Ray's actor table no longer has ActorClassName"
    kill = tuple(inspect.signature(CoreWorker.kill_actor).parameters)
    assert kill == ("self", "actor_id", "no_restart"), f"ray._raylet.CoreWorker.kill_actor now takes {kill}"
    assert isinstance(ray_worker.global_worker, ray_worker.Worker), "ray._private.worker.global_worker"
    assert callable(ray.JobID.from_hex) and callable(ray.ActorID.from_hex) and callable(RuntimeContext.get_job_id)
    assert ClientAppActor.__ray_metadata__.class_name == watchdog.CLIENT_ACTOR_CLASS, "Flower renamed its Ray actor"
    assert not ray.is_initialized()  # nothing above started Ray


# --------------------------------------------------------------------------- what a run observes
class CountingPool:
    """The part of the process backend's pool a witness reads."""

    def __init__(self, handled: int) -> None:
        self.handled = handled


def _reply(content: bool) -> Message:
    query = Message(RecordDict({"config": ConfigRecord({"round": 0})}), dst_node_id=1, message_type=MessageType.QUERY)
    return Message(RecordDict({"metrics": ConfigRecord({"ok": 1})}) if content else Error(code=0, reason="x"),
                   reply_to=query)


def test_the_witness_names_the_backend_that_handled_messages():
    assert EngineWitness("processes", CountingPool(3), ray_up=lambda: True).ran_on() == "processes"
    assert EngineWitness("processes", CountingPool(0), ray_up=lambda: True).ran_on() == "ray"
    assert EngineWitness("ray", None, ray_up=lambda: True).ran_on() == "ray"
    assert EngineWitness("processes", CountingPool(0), ray_up=lambda: False).ran_on() == "unknown"


def test_a_run_that_flower_took_to_ray_stops_naming_the_fix():
    witness = EngineWitness("processes", CountingPool(0), ray_up=lambda: True)
    with pytest.raises(EngineBypassed, match=r"on Ray instead of the engine's process backend.*flwr==1\.41\.0.*"
                                             r"engine\.backend=ray"):
        witness.check([_reply(content=False), _reply(content=True)])


def test_a_pump_flower_never_called_stops_the_run_naming_the_fix():
    witness = EngineWitness("processes", CountingPool(2), threading.Event(), ray_up=lambda: False)
    with pytest.raises(EngineBypassed, match=r"never called the engine's message pump.*engine\.fast_pump=false"):
        witness.check([_reply(content=True)])


def test_what_the_engine_installed_and_flower_used_passes_the_check():
    called = threading.Event()
    called.set()
    EngineWitness("processes", CountingPool(1), called, ray_up=lambda: False).check([_reply(content=True)])
    EngineWitness("ray", None, called, ray_up=lambda: True).check([_reply(content=True)])
    EngineWitness("ray", None, None, ray_up=lambda: False).check([_reply(content=True)])  # nothing installed
    # no ClientApp answered yet: nothing to conclude (the cloud's discovery then fails by name)
    EngineWitness("processes", CountingPool(0), threading.Event(), ray_up=lambda: True).check([_reply(False)])


def test_the_backend_is_recorded_in_the_summary_of_results_json(tmp_path):
    writer = ResultsWriter(tmp_path, {"seed": 0})
    writer.finish("completed", extra_summary={"devices_discovered": 6})
    EngineWitness("processes", CountingPool(5)).record(tmp_path)
    results = load_results(tmp_path)
    assert results["summary"]["engine_backend"] == "processes" and results["summary"]["devices_discovered"] == 6
    assert results["status"] == "completed"


def test_recording_never_raises_over_a_failed_run(tmp_path, caplog):
    EngineWitness("ray", None, ray_up=lambda: False).record(tmp_path)  # the ServerApp wrote nothing
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "results.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="experiments.engine.guards"):
        EngineWitness("ray", None, ray_up=lambda: True).record(tmp_path)
    assert "could not record the engine backend" in caplog.text
    with pytest.raises(json.JSONDecodeError):
        json.loads((tmp_path / "results.json").read_text())  # left as it was


def test_the_deprecation_notice_is_rewritten_once_and_other_records_pass():
    notice = DeprecationNotice(verbose=True)

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("flwr", logging.WARNING, __file__, 1, "DEPRECATED FEATURE: %s", (text,), None)

    first, again = record(f"{FLOWER_DEPRECATION_MARK} and will be removed"), record(FLOWER_DEPRECATION_MARK)
    other = record("`start_client` is deprecated")
    assert notice.filter(first) and first.getMessage() == ENGINE_NOTICE
    assert not notice.filter(again)
    assert notice.filter(other) and "start_client" in other.getMessage()


def test_the_notice_is_installed_once_on_flowers_logger():
    flwr_logger = logging.getLogger(guards.FLOWER_LOGGER)
    before = list(flwr_logger.filters)
    try:
        first = notice_deprecation()
        assert notice_deprecation() is first
        assert sum(isinstance(f, DeprecationNotice) for f in flwr_logger.filters) == 1
    finally:
        flwr_logger.filters[:] = before


# --------------------------------------------------------------------------- the watchdog
def test_a_watchdog_that_cannot_stop_client_apps_warns(monkeypatch, caplog):
    def broken(backend):
        raise AttributeError("'Worker' object has no attribute 'core_worker'")

    monkeypatch.setattr(watchdog, "stop_running_client_apps", broken)
    server_done, run_done = threading.Event(), threading.Event()
    server_done.set()
    with caplog.at_level(logging.WARNING, logger="experiments.engine.watchdog"):
        watchdog.watch(server_done, run_done, 0.0, "ray")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "could not stop the ClientApps still running on the ray backend (AttributeError" in caplog.text


def test_a_watchdog_that_stopped_client_apps_warns_and_one_that_was_not_needed_is_silent(monkeypatch, caplog):
    monkeypatch.setattr(watchdog, "stop_running_client_apps", lambda backend: 2)
    server_done, run_done = threading.Event(), threading.Event()
    server_done.set()
    with caplog.at_level(logging.WARNING, logger="experiments.engine.watchdog"):
        watchdog.watch(server_done, run_done, 0.0, "processes")
        run_done.set()
        watchdog.watch(server_done, run_done, 0.0, "processes")
    assert len(caplog.records) == 1 and "stopped 2 ClientApp" in caplog.text
