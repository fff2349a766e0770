"""The only module that calls Flower's simulation API (Flower's API churns: one place absorbs it).

Helpers of this module reach into the runtime's internals on its behalf and are used by
nothing else: :mod:`experiments.engine.processes` (a simulation ``Backend`` on local worker
processes), :mod:`experiments.engine.worker` (what runs in a worker),
:mod:`experiments.engine.forkserver` (the fork server the workers come from, forked off the
driver) and :mod:`experiments.engine.fastpath` (the message pump). Together these files are
the engine; ARCHITECTURE.md's single ``engine.py`` grew into them (issue 7).

``simulate(cfg, run_dir)`` runs the ServerApp and ClientApp of this project on Flower's
simulation engine: with ``engine.backend=processes`` (what ``auto``, the default, picks on one
machine) on local worker processes without Ray (:mod:`experiments.engine.processes`); with
``engine.backend=ray``, on Flower's Ray backend: a local Ray, or an existing Ray cluster when
``engine.ray_address`` is set (``auto`` after ``ray start --head``; the backend ``auto`` then
picks Ray).

A run never hangs (issue 6). What Flower 1.41's ``run_simulation`` does, measured:

* the ServerApp raises: ``run_simulation`` re-raises it once the runtime has stopped;
* every ClientApp raises (or its Ray actor dies): each message gets an error reply, so the
  ServerApp's waits end (discovery then fails: "no device answered discovery");
* a ClientApp that never returns: the ServerApp's waits end at ``engine.round_timeout_s``,
  but ``run_simulation`` then waits for that ClientApp forever (its worker thread joins
  the Ray call). Hence the watchdog: :data:`SHUTDOWN_GRACE_S` after the ServerApp has
  finished, it stops this run's ClientApp actors that are still alive.

While the cloud pre-trains, every simulated device answers one warm-up query
(:func:`warm_up_fleet`), and the cloud's first exchange waits for it: Flower starts the
ServerApp and Ray side by side, and the Ray actors' start-up would otherwise count
against the cloud's discovery timeout.

``faults.crash_server_round=r`` makes the ServerApp raise when it sends round r's first
message (:class:`EngineGrid`), to test that a sweep goes on past a crashed job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import experiments  # noqa: F401  (offline switches before Flower/Ray import)
from experiments.client_app import build_client_app
from experiments.config import RunConfig, resolved_backend
from experiments.engine.fastpath import faster_message_pump, quicker_grid
from experiments.engine.processes import process_backend, stop_busy_workers, workers_for
from experiments.engine.worker import forks_workers, prepare_worker, quiet_flower_logs
from experiments.server_app import build_server_app

logger = logging.getLogger(__name__)

#: How long Flower may take, after the ServerApp has finished, to release its ClientApps
#: before the watchdog stops them (assumption: Flower's workers poll their queue every 1 s,
#: so a healthy shutdown has released every ClientApp within twice that; stopping an actor
#: Flower is about to terminate anyway is harmless).
SHUTDOWN_GRACE_S = 2.0
#: Ray actor class that runs ClientApps in Flower 1.41 (flwr.simulation.ray_transport.ray_actor).
CLIENT_ACTOR_CLASS = "ClientAppActor"
#: Longest wait for the simulated fleet's warm-up before the cloud starts anyway (assumption:
#: five times the slowest start-up measured on 2 busy cores, 60 s).
STARTUP_WAIT_S = 300.0
#: How often the warm-up polls for registered nodes (seconds).
STARTUP_POLL_S = 0.2

def backend_config(cfg: RunConfig) -> dict:
    """Flower's Ray backend config: resources per ClientApp and how to reach Ray."""
    engine = cfg.engine
    init_args: dict = {"address": engine.ray_address} if engine.ray_address else {}
    return {
        "client_resources": {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus},
        "init_args": init_args,
    }


class InjectedServerCrash(RuntimeError):
    """The ServerApp crash that ``faults.crash_server_round`` asks for."""


class FleetWarmUp(threading.Thread):
    """:func:`warm_up_fleet` in a thread started with the ServerApp; keeps the replies."""

    def __init__(self, grid: Any, devices: int, timeout_s: float) -> None:
        super().__init__(name="fleet-warm-up", daemon=True)
        self._args = (grid, devices, timeout_s)
        self.replies: list = []

    def run(self) -> None:  # noqa: D102
        self.replies = warm_up_fleet(*self._args)


def is_discovery(messages: list) -> bool:
    """Whether ``messages`` are the cloud's discovery: round-0 QUERYs carrying nothing but that config."""
    from flwr.app import MessageType

    def bare_query(msg) -> bool:
        content = msg.content
        config = content.config_records.get("config")
        return (msg.metadata.message_type == MessageType.QUERY and list(content.keys()) == ["config"]
                and config is not None and dict(config) == {"round": 0})

    return bool(messages) and all(bare_query(m) for m in messages)


def local_samples(reply: Any) -> float:
    """A device's training samples from its discovery reply (0 when it does not say)."""
    metrics = reply.content.metric_records.get("metrics")
    value = None if metrics is None else metrics.get("num_examples")
    return float(value) if isinstance(value, (int, float)) else 0.0


def largest_first(messages: list, work: dict[int, float]) -> list:
    """``messages`` ordered by their device's ``work``, largest first (stable for ties and unknowns).

    The simulation hands messages to its ClientApp slots in the order they were pushed, so this
    is the longest-processing-time-first rule: the device that trains longest starts first and
    the round does not wait for a large device that started last. Replies are aggregated in
    partition order, so results do not change.
    """
    return sorted(messages, key=lambda m: -work.get(m.metadata.dst_node_id, 0.0))


class EngineGrid:
    """The Flower Grid the project's ServerApp sees in simulation.

    Its first exchange waits for the fleet's warm-up (a thread started with the ServerApp, so
    the warm-up overlaps the cloud's pre-training), and the cloud's discovery is answered with
    the warm-up's replies where they have content (both are the same round-0 query; the rest
    are asked again), so the fleet answers once. With ``crash_round`` set it raises
    :class:`InjectedServerCrash` on the first message of that round (a message's round is its
    ``config`` record's ``round``; 0 is discovery). Messages go out largest device first
    (:func:`largest_first`, by the training samples each device reported). Every other call
    goes to the wrapped grid.
    """

    def __init__(self, grid: Any, warm_up: FleetWarmUp, crash_round: int | None = None) -> None:
        self._grid = grid
        self._warm_up = warm_up
        self._warm_replies: dict[int, Any] | None = None
        self._work: dict[int, float] = {}
        self.crash_round = crash_round

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _ready(self, messages) -> list:
        if self._warm_replies is None:
            self._warm_up.join()
            self._warm_replies = {r.metadata.src_node_id: r for r in self._warm_up.replies if r.has_content()}
            self._work = {node: local_samples(reply) for node, reply in self._warm_replies.items()}
        messages = largest_first(list(messages), self._work)
        for msg in messages:
            config = msg.content.config_records.get("config")
            if self.crash_round is not None and config is not None and config.get("round") == self.crash_round:
                raise InjectedServerCrash(f"injected ServerApp crash in round {self.crash_round} (faults.crash_server_round)")
        return messages

    def push_messages(self, messages):  # noqa: D102  (Grid API)
        return self._grid.push_messages(self._ready(messages))

    def send_and_receive(self, messages, *args, **kwargs):  # noqa: D102  (Grid API)
        messages = self._ready(messages)
        if not (self._warm_replies and is_discovery(messages)):
            return self._grid.send_and_receive(messages, *args, **kwargs)
        answered, self._warm_replies = self._warm_replies, {}  # used once
        known = [answered[m.metadata.dst_node_id] for m in messages if m.metadata.dst_node_id in answered]
        rest = [m for m in messages if m.metadata.dst_node_id not in answered]
        return known + (list(self._grid.send_and_receive(rest, *args, **kwargs)) if rest else [])


def watched_server_app(cfg: RunConfig, run_dir: Path, finished: threading.Event):
    """The project's ServerApp on an :class:`EngineGrid`; sets ``finished`` when it ends."""
    from flwr.serverapp import Grid, ServerApp

    inner = build_server_app(cfg, Path(run_dir))
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        try:
            warm_up = FleetWarmUp(grid, cfg.fleet.devices, STARTUP_WAIT_S)
            warm_up.start()
            if cfg.engine.fast_pump:
                quicker_grid(grid)
            inner(EngineGrid(grid, warm_up, cfg.faults.crash_server_round), context)
        finally:
            finished.set()

    return app


def warm_up_fleet(grid: Any, devices: int, timeout_s: float) -> list:
    """Ask every simulated device once (a round-0 query) so the cloud starts on a warm fleet; the replies.

    Flower starts the ServerApp and Ray side by side, and each Ray actor loads the
    ClientApp (torch, the data) on its first message: measured 20-60 s on 2 busy cores,
    which would otherwise eat into the cloud's discovery timeout (``engine.round_timeout_s``).
    On real devices SuperNodes are up before a run, as the fleet is after this. Returns
    the replies (:class:`EngineGrid` answers the cloud's discovery with them).
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    deadline = time.monotonic() + timeout_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < devices and time.monotonic() < deadline:
        time.sleep(STARTUP_POLL_S)
        node_ids = list(grid.get_node_ids())
    query = RecordDict({"config": ConfigRecord({"round": 0})})
    messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=max(deadline - time.monotonic(), 0.0)))
    answered = sum(1 for reply in replies if reply.has_content())
    if answered < devices:
        logger.warning("only %d of %d devices answered the warm-up within %.0f s", answered, devices, timeout_s)
    return replies


def _client_actors() -> dict[str, dict]:
    """This job's live ClientApp actors by actor id ({} before Ray is up).

    Reads Ray's GCS actor table (``ray._private.state.actors``, a developer API): Flower
    keeps the actor handles to itself.
    """
    import ray
    from ray._private import state as ray_state

    if not ray.is_initialized():
        return {}
    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    alive = ray_state.actors(job_id=job, actor_state_name="ALIVE")
    return {actor_id: info for actor_id, info in alive.items() if info.get("ActorClassName") == CLIENT_ACTOR_CLASS}


def stop_client_actors() -> int:
    """Kill this job's ClientApp actors that are still alive; returns how many."""
    import ray
    from ray._private.worker import global_worker

    stopped = 0
    for actor_id in _client_actors():
        global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)
        stopped += 1
    return stopped


def _watchdog(server_done: threading.Event, run_done: threading.Event, grace_s: float, backend: str) -> None:
    server_done.wait()
    if run_done.wait(grace_s):
        return
    try:
        stopped = stop_busy_workers() if backend == "processes" else stop_client_actors()
    except Exception as exc:  # Ray shutting down under us: nothing left to stop
        logger.debug("watchdog found Ray shutting down: %r", exc)
        return
    if stopped:  # in a healthy shutdown Flower has terminated its actors and Ray by now
        logger.warning("the ServerApp finished %.0f s ago and the simulation had not ended: stopped %d ClientApp "
                       "actor(s) still up (a stalled device holds one)", grace_s, stopped)


def run_apps(server_app: Any, client_app: Any, *, num_supernodes: int, backend: dict, verbose: bool) -> None:
    """Flower's ``run_simulation`` on the given apps: the project's one call of the simulation API.

    :func:`simulate` runs the project's apps through it; the benchmark's plain-Flower
    baseline (``experiments/bench/plain.py``) runs Flower's own FedAvg through it.
    """
    from flwr.simulation import run_simulation

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                   backend_config=backend, verbose_logging=verbose)


def client_backend(cfg: RunConfig, run_dir: Path):
    """Where the ClientApps run: Flower's Ray backend as it ships, or :mod:`experiments.engine.processes`."""
    if resolved_backend(cfg.engine) != "processes":
        return contextlib.nullcontext()
    return process_backend(functools.partial(build_client_app, cfg, run_dir), workers_for(cfg.engine.num_cpus),
                           initializer=functools.partial(prepare_worker, cfg), fork_now=forks_workers(cfg.engine))


def simulate(cfg: RunConfig, run_dir: Path, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Run one simulation of ``cfg``; results land in ``run_dir``; errors propagate.

    ``grace_s`` after the ServerApp ends, ClientApps still running are stopped (module docstring).
    """
    quiet_flower_logs(cfg.engine.verbose)
    server_done, run_done = threading.Event(), threading.Event()
    watchdog = threading.Thread(target=_watchdog, args=(server_done, run_done, grace_s, resolved_backend(cfg.engine)), daemon=True)
    pump = faster_message_pump() if cfg.engine.fast_pump else contextlib.nullcontext()
    try:
        with pump, client_backend(cfg, Path(run_dir)):  # workers first: forked before any thread
            watchdog.start()
            run_apps(
                watched_server_app(cfg, run_dir, server_done),
                build_client_app(cfg, Path(run_dir)),
                num_supernodes=cfg.fleet.devices,
                backend=backend_config(cfg),
                verbose=cfg.engine.verbose,
            )
    finally:
        run_done.set()
        server_done.set()  # releases the watchdog if the ServerApp never started
