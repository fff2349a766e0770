"""The watchdog that ends ClientApps still running after the ServerApp has finished.

Flower 1.41's ``run_simulation`` ends the ServerApp's waits at ``engine.round_timeout_s``,
but then waits forever for a ClientApp that never returns (its worker thread joins the
backend call). :func:`watch` runs beside the simulation: :data:`SHUTDOWN_GRACE_S` after the
ServerApp has finished, if the simulation has not ended, it stops the ClientApps still
running: the process backend's busy workers
(:func:`experiments.engine.processes.stop_busy_workers`), or this job's Ray actors of class
:data:`CLIENT_ACTOR_CLASS` through two of Ray's private calls, ``ray._private.state.actors``
(the GCS actor table) and ``global_worker.core_worker.kill_actor`` (Flower keeps the actor
handles to itself). tests/test_engine_guards.py checks that those calls exist with the
signatures used here; when one fails at run time the watchdog says so at WARNING.
"""

from __future__ import annotations

import logging
import threading

from experiments.engine.processes import stop_busy_workers

logger = logging.getLogger(__name__)

#: How long Flower may take, after the ServerApp has finished, to release its ClientApps
#: before the watchdog stops them (assumption: Flower's workers poll their queue every 1 s,
#: so a healthy shutdown has released every ClientApp within twice that; stopping an actor
#: Flower is about to terminate anyway is harmless).
SHUTDOWN_GRACE_S = 2.0
#: Ray actor class that runs ClientApps in Flower 1.41 (flwr.simulation.ray_transport.ray_actor).
CLIENT_ACTOR_CLASS = "ClientAppActor"
#: The state filter of Ray's actor table for actors still up.
ALIVE = "ALIVE"


def client_actors() -> dict[str, dict]:
    """This job's live ClientApp actors by actor id ({} before Ray is up).

    Reads Ray's GCS actor table (``ray._private.state.actors``, a developer API). Ray is
    imported here, not with the module: it costs over a second and the process backend,
    the default, never needs it.
    """
    import ray
    from ray._private import state as ray_state

    if not ray.is_initialized():
        return {}
    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    alive = ray_state.actors(job_id=job, actor_state_name=ALIVE)
    return {actor_id: info for actor_id, info in alive.items() if info.get("ActorClassName") == CLIENT_ACTOR_CLASS}


def stop_client_actors() -> int:
    """Kill this job's ClientApp actors that are still alive (no restart); returns how many."""
    import ray
    from ray._private.worker import global_worker

    stopped = 0
    for actor_id in client_actors():
        global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)
        stopped += 1
    return stopped


def stop_running_client_apps(backend: str) -> int:
    """Stop the ClientApps still running on ``backend`` ("processes" or "ray"); returns how many."""
    return stop_busy_workers() if backend == "processes" else stop_client_actors()


def watch(server_done: threading.Event, run_done: threading.Event, grace_s: float, backend: str) -> None:
    """Wait for the ServerApp to finish; ``grace_s`` later, stop the ClientApps the simulation still waits for.

    Runs in its own thread (:func:`experiments.engine.simulation.simulate` starts it). A failure
    to list or stop them is logged at WARNING with what failed, since the run may then hang.
    """
    server_done.wait()
    if run_done.wait(grace_s):
        return
    try:
        stopped = stop_running_client_apps(backend)
    except Exception as exc:  # noqa: BLE001  (Ray shutting down under us, or a changed private call)
        logger.warning("the ServerApp finished %.0f s ago and the simulation had not ended; the watchdog could not "
                       "stop the ClientApps still running on the %s backend (%s: %s). If the run does not end, "
                       "stop it with Ctrl-C; docs/ENGINE.md lists the Ray calls the watchdog relies on",
                       grace_s, backend, type(exc).__name__, exc)
        return
    if stopped:  # in a healthy shutdown Flower has terminated its actors and Ray by now
        logger.warning("the ServerApp finished %.0f s ago and the simulation had not ended: stopped %d ClientApp "
                       "actor(s) still up (a stalled device holds one)", grace_s, stopped)
