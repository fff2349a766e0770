"""A faster message pump for Flower 1.41's simulation runtime, used by ``experiments.engine.simulation``.

Flower's simulation hands messages to the Ray actors through one thread,
``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``: every 0.1 s it calls
``state.get_message_ins(node_id, limit=1)`` for EVERY simulated node, and each such call
scans every stored message and re-checks each one's expiry and federation
(``InMemoryLinkState._check_stored_messages``). With N nodes and M messages in flight that
is N x M checks per sweep, ten sweeps a second, in the process that also runs the cloud:
measured with py-spy on a 100-device FedAvg run (cohort 10), this thread took about 10 % of
all samples of the cloud process, and it grows with the fleet. A message also waits up to
0.1 s for the next sweep, and the cloud's grid waits up to 0.1 s before it sees a reply.

:func:`pump_messages` does the same work in ONE pass over the stored messages per sweep
(check every message once, deliver at most one undelivered message per node, as
``limit=1`` does, oldest first) and sweeps every :data:`PUMP_INTERVAL_S`;
:func:`faster_message_pump` installs it for the duration of a simulation. It reads the
in-memory link state's own fields (``lock``, ``message_ins_store``,
``_check_stored_messages``), which Flower does not promise to keep: :func:`supports`
checks for them, and a state without them is pumped by Flower's own function, unchanged (with
a warning). :func:`faster_message_pump` reports whether Flower called the pump at all, so a run
can fail by name when Flower stops looking it up (:mod:`experiments.engine.guards`).
Only the project's runs use it; the plain-Flower baseline of the benchmark
(``experiments/bench/plain.py``) runs Flower as it ships.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from queue import Queue
from typing import Any

from flwr.server.superlink.fleet.vce import vce_api
from flwr.supercore.date import now

logger = logging.getLogger(__name__)

#: Seconds between two sweeps of the pump (Flower 1.41's own: 0.1 s). One sweep is one pass
#: over the messages in flight (at most a cohort), microseconds each; 10 ms bounds a
#: message's wait for delivery at the cost of ~100 cheap wake-ups a second.
PUMP_INTERVAL_S = 0.01
#: Seconds between two polls of the cloud's grid for replies (Flower 1.41's InMemoryGrid
#: default ``pull_interval``: 0.1 s). A poll checks only the messages of one exchange.
GRID_PULL_S = 0.01
#: What the in-memory link state must have for :func:`take_undelivered` (Flower 1.41).
STATE_FIELDS = ("lock", "message_ins_store", "_check_stored_messages")


def supports(state: Any) -> bool:
    """Whether ``state`` has the in-memory link state fields :func:`take_undelivered` reads."""
    return all(hasattr(state, name) for name in STATE_FIELDS)


def take_undelivered(state: Any, node_ids: set[int]) -> list:
    """Mark and return the oldest undelivered message of every node in ``node_ids``.

    Equivalent to calling ``state.get_message_ins(node_id, limit=1)`` for each node (expired
    or orphaned messages are dropped by the state's own check first; a delivered message is
    stamped ``delivered_at`` so it is never handed out twice), in one pass.

    Parameters
    ----------
    state : InMemoryLinkState
        Flower's in-memory link state (see :func:`supports`).
    node_ids : set of int
        The simulated nodes.

    Returns
    -------
    list of Message
        At most one per node, in the order the messages were stored.
    """
    picked: dict[int, Any] = {}
    with state.lock:
        state._check_stored_messages(set(state.message_ins_store))
        for message in state.message_ins_store.values():
            metadata = message.metadata
            node = metadata.dst_node_id
            if metadata.delivered_at == "" and node in node_ids and node not in picked:
                picked[node] = message
        stamp = now().isoformat()
        for message in picked.values():
            message.metadata.delivered_at = stamp
    return list(picked.values())


def pump_messages(state: Any, queue: Queue, nodes_mapping: Mapping[int, int], f_stop: threading.Event,
                  interval_s: float = PUMP_INTERVAL_S) -> None:
    """Flower's ``add_messages_to_queue`` with one pass per sweep (same arguments, plus ``interval_s``)."""
    node_ids = set(nodes_mapping)
    while not f_stop.is_set():
        for message in take_undelivered(state, node_ids):
            queue.put(message)
        f_stop.wait(interval_s)


def _pump_or_flower(flower_pump: Callable[..., None], called: threading.Event) -> Callable[..., None]:
    """The pump Flower's runtime calls: :func:`pump_messages`, or ``flower_pump`` for another link state."""

    def pump(state, queue, nodes_mapping, f_stop) -> None:
        called.set()
        if supports(state):
            pump_messages(state, queue, nodes_mapping, f_stop)
            return
        logger.warning("Flower's link state (%s) lacks %s: its messages go through Flower's own pump, "
                       "the one-pass pump is off for this run", type(state).__name__, ", ".join(STATE_FIELDS))
        flower_pump(state, queue, nodes_mapping, f_stop)

    return pump


@contextlib.contextmanager
def faster_message_pump() -> Iterator[threading.Event]:
    """Inside the block, Flower's simulation runtime pumps messages with :func:`pump_messages`.

    Replaces ``vce_api.add_messages_to_queue`` (Flower 1.41's ``run_api`` looks it up when it
    starts its thread) and restores Flower's function on exit, even on error. Yields an event
    that is set once Flower has called the pump (tests/test_engine_guards.py checks that it does).
    """
    called = threading.Event()
    flower_pump = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = _pump_or_flower(flower_pump, called)
    try:
        yield called
    finally:
        vce_api.add_messages_to_queue = flower_pump


def quicker_grid(grid: Any) -> Any:
    """Make the cloud's grid poll for replies every :data:`GRID_PULL_S` (if it polls at all)."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = GRID_PULL_S
    return grid
