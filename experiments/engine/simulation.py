"""The only module that calls Flower's simulation API (Flower's API churns: one place absorbs it).

Helpers of this module reach into the runtime's internals on its behalf and are used by
nothing else: :mod:`experiments.engine.processes` (a simulation ``Backend`` on local worker
processes), :mod:`experiments.engine.worker` (what runs in a worker),
:mod:`experiments.engine.forkserver` (the fork server the workers come from, forked off the
driver), :mod:`experiments.engine.fastpath` (the message pump),
:mod:`experiments.engine.watchdog` (ends ClientApps that outlive the ServerApp) and
:mod:`experiments.engine.guards` (checks, while a run runs, that Flower used what the engine
installed, and records the backend that ran the ClientApps). docs/ENGINE.md lists every
Flower and Ray internal the engine relies on and the test that guards it.

``simulate(cfg, run_dir)`` runs the ServerApp and ClientApp of this project on Flower's
simulation engine: with ``engine.backend=processes`` (what ``auto``, the default, picks on one
machine) on local worker processes without Ray (:mod:`experiments.engine.processes`); with
``engine.backend=ray``, on Flower's Ray backend: a local Ray, or an existing Ray cluster when
``engine.ray_address`` is set (``auto`` after ``ray start --head``; the backend ``auto`` then
picks Ray).

A run never hangs. What Flower 1.41's ``run_simulation`` does, measured:

* the ServerApp raises: ``run_simulation`` re-raises it once the runtime has stopped;
* every ClientApp raises (or its Ray actor dies): each message gets an error reply, so the
  ServerApp's waits end (discovery then fails: "no device answered discovery");
* a ClientApp that never returns: the ServerApp's waits end at ``engine.round_timeout_s``,
  but ``run_simulation`` then waits for that ClientApp forever (its worker thread joins
  the backend call). Hence the watchdog (:mod:`experiments.engine.watchdog`): a grace
  period after the ServerApp has finished, it stops this run's ClientApps still running.

While the cloud pre-trains, every simulated device answers one warm-up query
(:func:`warm_up_fleet`), and the cloud's first exchange waits for it: Flower starts the
ServerApp and Ray side by side, and the Ray actors' start-up would otherwise count
against the cloud's discovery timeout.

The cloud's first exchange after the warm-up is also where the run checks that Flower used the
backend and pump the engine installed (:meth:`~experiments.engine.guards.EngineWitness.check`),
so a run that Flower took around them fails before the cloud trains, naming the fix.

``faults.crash_server_round=r`` makes the ServerApp raise when it sends round r's first
message (:class:`EngineGrid`), to test that a sweep goes on past a crashed job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

import experiments  # noqa: F401  (offline switches before Flower/Ray import)
from experiments.client_app import build_client_app
from experiments.config import resolved_backend
from experiments.engine.fastpath import faster_message_pump, quicker_grid
from experiments.engine.guards import PINNED_FLOWER, EngineWitness, notice_deprecation
from experiments.engine.processes import process_backend, workers_for
from experiments.engine.watchdog import SHUTDOWN_GRACE_S, watch
from experiments.engine.worker import forks_workers, prepare_worker, quiet_flower_logs
from experiments.schema import RunConfig
from experiments.server_app import build_server_app

try:
    from flwr.simulation import run_simulation
except ImportError as exc:  # the one entry point the engine runs on (docs/ENGINE.md)
    raise ImportError(f"this Flower has no flwr.simulation.run_simulation, the engine's entry point; install "
                      f"{PINNED_FLOWER} (pyproject.toml pins it); docs/ENGINE.md says what replaces it") from exc

logger = logging.getLogger(__name__)

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

    def bare_query(msg) -> bool:
        content = msg.content
        config = content.config_records.get("config")
        return (msg.metadata.message_type == MessageType.QUERY and list(content.keys()) == ["config"]
                and config is not None and dict(config) == {"round": 0})

    return bool(messages) and all(bare_query(m) for m in messages)


def local_samples(reply: Any) -> float:
    """A device's training samples from its discovery reply (0 when it does not say)."""
    metrics = reply.content.metric_records.get("metrics")
    value = None if metrics is None else metrics.get("num-examples")
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
    goes to the wrapped grid. ``on_warm_up``, if given, is called with the warm-up's replies
    before the first exchange goes out (the engine checks there that Flower used what it
    installed: :meth:`~experiments.engine.guards.EngineWitness.check`); what it raises ends
    the ServerApp.
    """

    def __init__(self, grid: Any, warm_up: FleetWarmUp, crash_round: int | None = None,
                 on_warm_up: Callable[[Sequence[Any]], None] | None = None) -> None:
        self._grid = grid
        self._warm_up = warm_up
        self._on_warm_up = on_warm_up
        self._warm_replies: dict[int, Any] | None = None
        self._work: dict[int, float] = {}
        self.crash_round = crash_round

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _ready(self, messages) -> list:
        if self._warm_replies is None:
            self._warm_up.join()
            if self._on_warm_up is not None:
                self._on_warm_up(self._warm_up.replies)
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


def watched_server_app(cfg: RunConfig, run_dir: Path, finished: threading.Event, witness: EngineWitness) -> ServerApp:
    """The project's ServerApp on an :class:`EngineGrid`; sets ``finished`` when it ends.

    ``witness`` checks after the warm-up that Flower used what the engine installed, and
    records in results.json which backend ran the ClientApps once the ServerApp has
    finished (while the runtime, and Ray if it ran, are still up), whether it failed or not.
    """
    inner = build_server_app(cfg, Path(run_dir))
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        try:
            warm_up = FleetWarmUp(grid, cfg.fleet.devices, STARTUP_WAIT_S)
            warm_up.start()
            if cfg.engine.fast_pump:
                quicker_grid(grid)
            inner(EngineGrid(grid, warm_up, cfg.faults.crash_server_round, on_warm_up=witness.check), context)
        finally:
            try:
                witness.record(run_dir)
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


def run_apps(server_app: Any, client_app: Any, *, num_supernodes: int, backend: dict, verbose: bool) -> None:
    """Flower's ``run_simulation`` on the given apps: the project's one call of the simulation API.

    :func:`simulate` runs the project's apps through it; the benchmark's plain-Flower
    baseline (``experiments/bench/plain.py``) runs Flower's own FedAvg through it. Flower
    1.41 logs that ``run_simulation`` is deprecated; the engine says so in its own words
    (:class:`~experiments.engine.guards.DeprecationNotice`), once per process.
    """
    notice_deprecation(verbose)
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
    Raises :class:`~experiments.engine.guards.EngineBypassed` when Flower ran the run around the
    backend or pump the engine installed.
    """
    quiet_flower_logs(cfg.engine.verbose)
    backend = resolved_backend(cfg.engine)
    server_done, run_done = threading.Event(), threading.Event()
    watchdog = threading.Thread(target=watch, args=(server_done, run_done, grace_s, backend), daemon=True)
    pump = faster_message_pump() if cfg.engine.fast_pump else contextlib.nullcontext()
    try:
        with pump as pump_called, client_backend(cfg, Path(run_dir)) as pool:  # workers first: forked before any thread
            witness = EngineWitness(backend, pool, pump_called)
            watchdog.start()
            run_apps(
                watched_server_app(cfg, run_dir, server_done, witness),
                build_client_app(cfg, Path(run_dir)),
                num_supernodes=cfg.fleet.devices,
                backend=backend_config(cfg),
                verbose=cfg.engine.verbose,
            )
    finally:
        run_done.set()
        server_done.set()  # releases the watchdog if the ServerApp never started
