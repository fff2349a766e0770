"""The one-pass message pump (experiments/engine/fastpath.py) on Flower 1.41's real in-memory link state.

The state, run and nodes are set up as ``flwr.simulation.run_simulation`` sets them up; the
cloud's messages are pushed through Flower's real ``InMemoryGrid``. The pump must hand out
what Flower's ``get_message_ins(node, limit=1)`` per node hands out.
"""

from __future__ import annotations

import logging
import threading
import time
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from experiments.engine.fastpath import (
    GRID_PULL_S,
    faster_message_pump,
    pump_messages,
    quicker_grid,
    supports,
    take_undelivered,
)


def _simulation_state(num_nodes: int):
    """A link state, grid and node mapping as Flower's run_simulation builds them."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    nodes = vce_api._register_nodes(num_nodes, factory)
    return state, grid, nodes


def _push(grid, node_ids, rounds=(1,)):
    """Push one QUERY per node and round, addressed as the ServerApp's grid addresses them."""
    messages = []
    for r in rounds:
        for n in node_ids:
            msg = Message(RecordDict({"config": ConfigRecord({"round": r, "to": int(n)})}), dst_node_id=n,
                          message_type=MessageType.QUERY)
            msg.metadata.__dict__.update(_run_id=grid.run.run_id, _src_node_id=SUPERLINK_NODE_ID)
            messages.append(msg)
    return list(grid.push_messages(messages))


def _content(msg) -> tuple[int, int]:
    config = msg.content["config"]
    return int(config["round"]), int(config["to"])


def test_one_pass_hands_out_what_flower_hands_out_per_node():
    state, grid, nodes = _simulation_state(5)
    ids = sorted(nodes)
    _push(grid, ids[:3], rounds=(1, 2))  # two messages for each of three nodes
    assert supports(state)
    first = take_undelivered(state, set(ids))
    # one per node, the oldest (round 1), marked delivered so never handed out twice
    assert sorted(_content(m) for m in first) == [(1, n) for n in ids[:3]]
    assert all(m.metadata.delivered_at != "" for m in first)
    second = take_undelivered(state, set(ids))
    assert sorted(_content(m) for m in second) == [(2, n) for n in ids[:3]]
    assert take_undelivered(state, set(ids)) == []
    # Flower's own per-node call agrees: nothing left for anyone
    assert all(state.get_message_ins(node_id=n, limit=1) == [] for n in ids)


def test_messages_to_unknown_nodes_stay_and_expired_ones_are_dropped():
    state, grid, nodes = _simulation_state(4)
    ids = sorted(nodes)
    pushed = _push(grid, ids)
    assert take_undelivered(state, set(ids[:2])) and len(state.message_ins_store) == 4
    # the two left for ids[2:] are still Flower's to deliver
    assert sorted(_content(m)[1] for m in take_undelivered(state, set(ids))) == ids[2:]
    stale = state.message_ins_store[pushed[0]]
    stale.metadata.created_at -= stale.metadata.ttl + 1.0  # expired: the state's own check drops it
    take_undelivered(state, set(ids))
    assert pushed[0] not in state.message_ins_store


def test_pump_thread_feeds_the_queue_and_stops():
    state, grid, nodes = _simulation_state(3)
    _push(grid, sorted(nodes))
    queue, stop = Queue(), threading.Event()
    thread = threading.Thread(target=pump_messages, args=(state, queue, nodes, stop), kwargs={"interval_s": 0.001})
    thread.start()
    deadline = time.monotonic() + 5.0
    while queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive() and queue.qsize() == 3


def test_context_installs_and_restores_flowers_pump_even_on_error():
    flower_pump = vce_api.add_messages_to_queue
    with pytest.raises(RuntimeError), faster_message_pump():
        assert vce_api.add_messages_to_queue is not flower_pump
        raise RuntimeError("simulation failed")
    assert vce_api.add_messages_to_queue is flower_pump


def test_a_state_without_the_fields_is_pumped_by_flower_with_a_warning(caplog):
    calls = []

    class OtherState:
        def get_message_ins(self, node_id, limit):
            calls.append(node_id)
            return []

    assert not supports(OtherState())
    with faster_message_pump() as called:
        pump = vce_api.add_messages_to_queue
    assert not called.is_set()
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    with caplog.at_level(logging.WARNING, logger="experiments.engine.fastpath"):
        pump(OtherState(), Queue(), {7: 0}, stop)
    assert calls and set(calls) == {7}
    assert called.is_set()  # Flower called the engine's pump, which handed over to Flower's
    assert "link state (OtherState) lacks lock, message_ins_store, _check_stored_messages" in caplog.text


def test_quicker_grid_sets_the_pull_interval_only_where_there_is_one():
    _, grid, _ = _simulation_state(1)
    assert quicker_grid(grid).pull_interval == GRID_PULL_S
    plain = object()
    assert quicker_grid(plain) is plain
