"""The engine's grid: the fleet answers its warm-up once, and that answers the cloud's discovery."""

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from experiments.engine.simulation import EngineGrid, FleetWarmUp, is_discovery, largest_first, warm_up_fleet
from strategies.fedavg import FedAvg


class CountingGrid:
    """Answers every QUERY with the node's partition id; node 3 fails its first query."""

    def __init__(self, nodes=(1, 2, 3)):
        self.nodes, self.sent, self.failed = list(nodes), [], set()

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append(node)
            if node == 3 and node not in self.failed:
                self.failed.add(node)
                reply = Message(_error(), reply_to=msg)
            else:
                content = RecordDict({"metrics": MetricRecord({"partition_id": node - 1, "num-examples": 10}),
                                      "budget": ConfigRecord({"flops_per_s": 1e9})})
                reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _error():
    return Error(code=0, reason="not up yet")


def _query(node, round_=0):
    return Message(RecordDict({"config": ConfigRecord({"round": round_})}), dst_node_id=node,
                   message_type=MessageType.QUERY)


def test_discovery_is_answered_by_the_warm_up_and_only_the_failed_node_is_asked_again():
    grid = CountingGrid()
    warm_up = FleetWarmUp(grid, devices=3, timeout_s=5)
    warm_up.start()
    engine_grid = EngineGrid(grid, warm_up)
    strategy = FedAvg(per_round=2, seed=0, expected_devices=3)
    strategy.discover(engine_grid)
    assert grid.sent == [1, 2, 3, 3]  # the warm-up, then node 3 once more
    assert sorted(strategy.devices) == [0, 1, 2]
    engine_grid.send_and_receive([_query(1)])  # a later query goes to the fleet
    assert grid.sent[-1] == 1


def test_only_bare_round_zero_queries_count_as_discovery():
    assert is_discovery([_query(1), _query(2)])
    assert not is_discovery([]) and not is_discovery([_query(1, round_=1)])
    train = Message(RecordDict({"config": ConfigRecord({"round": 0})}), dst_node_id=1, message_type=MessageType.TRAIN)
    assert not is_discovery([train])


def test_the_warm_up_returns_every_reply():
    replies = warm_up_fleet(CountingGrid(), devices=3, timeout_s=5)
    assert [r.has_content() for r in replies] == [True, True, False]


class SilentGrid(CountingGrid):
    """Every node fails every query."""

    def send_and_receive(self, messages, timeout=None):
        self.sent += [m.metadata.dst_node_id for m in messages]
        return [Message(_error(), reply_to=m) for m in messages]


def test_a_fleet_that_fails_warm_up_and_discovery_stops_the_run_by_name():
    grid = SilentGrid()
    warm_up = FleetWarmUp(grid, devices=3, timeout_s=5)
    warm_up.start()
    with pytest.raises(RuntimeError, match="no device answered discovery"):
        FedAvg(per_round=2, seed=0, expected_devices=3).discover(EngineGrid(grid, warm_up))
    assert grid.sent == [1, 2, 3, 1, 2, 3]  # errors are asked again, once


def test_messages_go_out_largest_device_first_after_the_warm_up():
    grid = CountingGrid()
    sizes = {1: 10, 2: 30, 3: 20}

    def answer(messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            grid.sent.append(node)
            content = RecordDict({"metrics": MetricRecord({"partition_id": node - 1, "num-examples": sizes[node]}),
                                  "budget": ConfigRecord({"flops_per_s": 1e9})})
            replies.append(Message(content, reply_to=msg))
        return replies

    grid.send_and_receive = answer
    warm_up = FleetWarmUp(grid, devices=3, timeout_s=5)
    warm_up.start()
    engine_grid = EngineGrid(grid, warm_up)
    grid.sent.clear()
    engine_grid.send_and_receive([_query(n, round_=1) for n in (1, 2, 3)])
    assert grid.sent == [2, 3, 1]
    unknown = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=9, message_type=MessageType.TRAIN)
    assert [m.metadata.dst_node_id for m in largest_first([unknown, _query(3)], {3: 20.0})] == [3, 9]


def test_the_warm_up_replies_are_checked_before_the_first_exchange_and_a_failed_check_ends_it():
    grid = CountingGrid()
    warm_up = FleetWarmUp(grid, devices=3, timeout_s=5)
    warm_up.start()
    checked = []

    def check(replies):
        checked.append([r.has_content() for r in replies])
        raise RuntimeError("Flower went around the engine")

    engine_grid = EngineGrid(grid, warm_up, on_warm_up=check)
    grid.sent.clear()
    with pytest.raises(RuntimeError, match="Flower went around the engine"):
        engine_grid.send_and_receive([_query(1, round_=0)])
    assert checked == [[True, True, False]] and grid.sent == []  # nothing went out after the failed check
