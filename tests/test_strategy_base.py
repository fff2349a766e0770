"""Strategy foundations: bytes on real messages, FedAvg arithmetic, seeded cohorts."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from strategies.aggregate import has_non_finite, same_layout, weighted_average, weighted_metric
from strategies.base import DeviceInfo, EdgeCloudStrategy
from strategies.payload import payload_bytes


def test_payload_bytes_of_a_hand_built_message():
    arrays = ArrayRecord({"w": Array(np.zeros((2, 3), dtype=np.float32))})
    array_bytes = len(arrays["w"].data)  # numpy buffer + Flower's .npy header
    assert array_bytes >= 24
    content = RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord({"round": 3, "mode": "abc", "flag": True}),
            "metrics": MetricRecord({"acc": 0.5}),
        }
    )
    expected = (
        len("arrays") + len("w") + array_bytes
        + len("config") + (len("round") + 8) + (len("mode") + 3) + (len("flag") + 1)
        + len("metrics") + (len("acc") + 8)
    )
    assert payload_bytes(content) == expected


def test_payload_bytes_grows_with_array_size():
    small = RecordDict({"a": ArrayRecord({"w": Array(np.zeros(10, dtype=np.float32))})})
    large = RecordDict({"a": ArrayRecord({"w": Array(np.zeros(1010, dtype=np.float32))})})
    assert payload_bytes(large) - payload_bytes(small) == 1000 * 4


def _record(**arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def test_weighted_average_against_hand_computed_numbers():
    a = _record(w=np.array([1.0, 2.0], dtype=np.float32), n=np.array(10, dtype=np.int64))
    b = _record(w=np.array([4.0, 8.0], dtype=np.float32), n=np.array(20, dtype=np.int64))
    out = weighted_average([a, b], [1.0, 2.0])
    # w: 1/3*[1,2] + 2/3*[4,8] = [3, 6]; n: 1/3*10 + 2/3*20 = 16.67 -> 17 (integers round)
    np.testing.assert_allclose(out["w"].numpy(), [3.0, 6.0])
    assert out["w"].numpy().dtype == np.float32
    assert out["n"].numpy() == 17 and out["n"].numpy().dtype == np.int64


def test_weighted_average_rejects_bad_weights():
    a = _record(w=np.ones(2))
    with pytest.raises(ValueError, match="positive"):
        weighted_average([a], [0.0])
    with pytest.raises(ValueError, match="as many weights"):
        weighted_average([a], [1.0, 2.0])


def test_weighted_metric_skips_non_finite():
    assert weighted_metric([0.5, float("nan"), 1.0], [1, 5, 3]) == pytest.approx((0.5 + 3.0) / 4)
    assert weighted_metric([float("nan")], [1]) is None


def test_layout_and_finiteness_checks():
    good = _record(w=np.ones((2, 2), dtype=np.float32))
    assert same_layout(good, {"w": (2, 2)}) is None
    assert "shape" in same_layout(good, {"w": (2, 3)})
    assert "keys" in same_layout(good, {"v": (2, 2)})
    assert has_non_finite(good) is None
    assert has_non_finite(_record(w=np.array([1.0, np.nan], dtype=np.float32))) == "w"


class _Plain(EdgeCloudStrategy):
    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        return None, None


def _strategy(seed, n=50, per_round=5):
    strategy = _Plain(per_round=per_round, seed=seed, expected_devices=n)
    strategy.devices = {pid: DeviceInfo(pid, 1000 + pid, 100, {}) for pid in range(n)}
    return strategy


def test_cohorts_are_seeded_by_partition_id_and_round():
    first, again, other = _strategy(0), _strategy(0), _strategy(1)
    cohorts = [first.cohort(r) for r in range(1, 6)]
    assert cohorts == [again.cohort(r) for r in range(1, 6)]
    assert cohorts != [other.cohort(r) for r in range(1, 6)]
    assert all(len(c) == 5 and len(set(c)) == 5 for c in cohorts)
    assert len({tuple(c) for c in cohorts}) > 1  # rounds differ


def test_cohort_never_exceeds_the_fleet():
    assert sorted(_strategy(0, n=3, per_round=5).cohort(1)) == [0, 1, 2]


def test_per_round_must_be_positive():
    with pytest.raises(ValueError, match="per_round"):
        _Plain(per_round=0, seed=0, expected_devices=1)


def test_update_divergence_by_hand():
    from strategies.aggregate import update_divergence

    cloud = _record(w=np.zeros(2, dtype=np.float32), n=np.array(1, dtype=np.int64))
    a = _record(w=np.array([1.0, 0.0], dtype=np.float32), n=np.array(2, dtype=np.int64))
    b = _record(w=np.array([3.0, 2.0], dtype=np.float32), n=np.array(3, dtype=np.int64))
    # deltas [1,0] and [3,2]; mean [2,1]; squared deviations 1+1+1+1 = 4 over 4 elements
    assert update_divergence(cloud, [a, b]) == pytest.approx(1.0)
    assert update_divergence(cloud, [a]) is None  # one holder: nothing to compare
    partial = _record(v=np.ones(3, dtype=np.float32))
    assert update_divergence(cloud, [a, partial]) is None


def test_an_error_reply_written_by_the_superlink_is_charged_to_the_device_it_answers():
    """A dead node's 'Node Unavailable' reply carries the SuperLink's node id (1), not the device's."""
    from flwr.app import Error

    class SuperLinkGrid:
        def send_and_receive(self, messages, timeout=None):
            replies = []
            for i, msg in enumerate(messages):
                msg.metadata.__dict__["_message_id"] = f"m{i}"
                reply = Message(Error(code=3, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for the node
                replies.append(reply)
            return replies

    strategy = _Plain(per_round=1, seed=0, expected_devices=1)
    strategy.devices[4] = DeviceInfo(4, 104, 10, {"uplink_bps": 1e6, "downlink_bps": 1e6})
    strategy._by_node[104] = 4
    messages = strategy.messages_for(1, MessageType.TRAIN, lambda pid: RecordDict({"config": ConfigRecord({"round": 1})}))
    assert strategy.exchange(SuperLinkGrid(), messages, "train") == []
    assert strategy.ledger.failures == [{"partition_id": 4, "phase": "train", "reason": "Node Unavailable"}]


class _Evaluating(_Plain):
    """Sends every cohort device an EVALUATE message (the base sends none)."""

    def configure_evaluate(self, server_round, arrays, config, grid):
        content = RecordDict({"config": self.round_config(server_round)})
        return self.messages_for(server_round, MessageType.EVALUATE, lambda pid: content)


class _WaitingGrid:
    """Answers the devices' evaluation only once the cloud's own evaluation has started."""

    def __init__(self, started):
        self.started = started

    def send_and_receive(self, messages, timeout=None):
        assert self.started.wait(5.0), "the cloud's test did not run while the devices evaluated"
        return [Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "num-examples": 10})}), reply_to=msg)
                for msg in messages]


def _evaluating_strategy(records):
    strategy = _Evaluating(per_round=2, seed=0, expected_devices=2, on_round=records.append)
    strategy.devices = {pid: DeviceInfo(pid, 100 + pid, 10, {"uplink_bps": 1e6, "downlink_bps": 1e6}) for pid in (0, 1)}
    strategy._by_node = {100: 0, 101: 1}
    return strategy


def test_the_cloud_evaluates_its_test_set_while_the_devices_evaluate():
    import threading

    started, records = threading.Event(), []

    def evaluate_fn(server_round, arrays):
        started.set()
        return MetricRecord({"accuracy": 0.75})

    strategy = _evaluating_strategy(records)
    strategy.run_round(_WaitingGrid(started), 1, _record(w=np.zeros(1, dtype=np.float32)), evaluate_fn=evaluate_fn)
    assert records[0]["global_accuracy"] == 0.75 and records[0]["accuracy"] == 0.5


def test_an_error_in_the_clouds_evaluation_reaches_the_caller():
    import threading

    started = threading.Event()

    def evaluate_fn(server_round, arrays):
        started.set()
        raise RuntimeError("global test set unreadable")

    strategy = _evaluating_strategy([])
    with pytest.raises(RuntimeError, match="unreadable"):
        strategy.run_round(_WaitingGrid(started), 1, _record(w=np.zeros(1, dtype=np.float32)), evaluate_fn=evaluate_fn)


def test_the_cohorts_pretrained_accuracy_is_weighted_like_accuracy_by_training_set_size():
    scores = {0: 0.5, 1: 0.9, 2: float("nan")}  # device 2's test set is empty: left out, as accuracy leaves it
    strategy = _Plain(per_round=3, seed=0, expected_devices=3, pretrained_accuracy=lambda pid, r: scores[pid] + r / 100)
    strategy.devices = {pid: DeviceInfo(pid, 100 + pid, size, {}) for pid, size in ((0, 10), (1, 30), (2, 50))}
    assert strategy.cohort_pretrained_accuracy(0, [0, 1, 2]) == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)  # 0.8
    assert strategy.cohort_pretrained_accuracy(10, [0]) == pytest.approx(0.6)  # the scorer sees the round
    assert strategy.cohort_pretrained_accuracy(1, []) is None
    assert _strategy(0).cohort_pretrained_accuracy(1, [0, 1]) is None  # no scorer: no "before"
