"""ECLM's cloud in a round (seed 001 sections 5.1-5.2): reply checks, aggregate_train, one full round.

Everything runs without Ray: hand-built Messages, and for one full round a fake grid that
hands each message to an :class:`clients.eclm.ECLMClient` in-process. The arithmetic the
round relies on (module-wise average, budgets, derive) is in ``tests/test_eclm_strategy.py``.
"""

import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from clients.base import Device, DeviceTensors
from clients.eclm import ECLMClient
from models.eclm.families import build_modular
from models.eclm.layer import module_of_key
from models.training import TrainSettings
from strategies.base import DeviceInfo
from strategies.eclm import ECLM, submodel_arrays
from tests.test_eclm_strategy import MLP, _f32

torch.set_num_threads(1)


# --------------------------------------------------------------------------- reply checks
def _checked_strategy():
    cloud = build_modular("modular_mlp", **MLP)
    from experiments.algorithms.eclm import catalog

    strategy = ECLM(
        catalog=catalog(cloud, 8), layer_sizes=cloud.layer_sizes(), samples_per_device=10, epochs=1,
        round_budget_s=10.0, size_cap=1.0, per_round=2, seed=0, expected_devices=2,
    )
    strategy._cloud = ArrayRecord(cloud.state_dict())
    strategy.selections = {0: ("l0.m0", "l0.m3")}
    return strategy, strategy._cloud


def _reply_arrays(full, ids):
    return ArrayRecord({k: v for k, v in submodel_arrays(full, ids, [4]).items() if not k.endswith(".active")})


def test_check_reply_accepts_the_sent_sub_model_and_subsets_of_it():
    strategy, full = _checked_strategy()
    assert strategy._check_reply(0, _reply_arrays(full, ("l0.m0", "l0.m3"))) is None
    assert strategy._check_reply(0, _reply_arrays(full, ("l0.m3",))) is None  # l0.m0 dropped under load


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda arrays, full: arrays.__setitem__("layers.0.modules.m1.0.bias", full["layers.0.modules.m1.0.bias"]),
         "module l0.m1 was not sent"),
        (lambda arrays, full: arrays.__setitem__("head.bias", Array(np.zeros(5, dtype=np.float32))),
         r"head.bias has shape \(5,\), expected \(4,\)"),
        (lambda arrays, full: arrays.__setitem__("head.bias", Array(_f32(0.0, np.nan, 0.0, 0.0))),
         "non-finite values in head.bias"),
        (lambda arrays, full: arrays.__setitem__("head.extra", Array(_f32(1.0))), "unknown key head.extra"),
    ],
)
def test_check_reply_rejects(tamper, match):
    strategy, full = _checked_strategy()
    arrays = _reply_arrays(full, ("l0.m0", "l0.m3"))
    tamper(arrays, full)
    problem = strategy._check_reply(0, arrays)
    assert problem is not None
    assert re.search(match, problem), problem


def test_check_reply_rejects_missing_arrays_and_unknown_devices():
    strategy, full = _checked_strategy()
    assert strategy._check_reply(0, None) == "no arrays"
    assert "not sent" in strategy._check_reply(9, _reply_arrays(full, ("l0.m0",)))  # pid 9 got nothing


def _train_reply(strategy, pid, arrays, num_examples=10):
    msg = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=strategy.devices[pid].node_id,
                  message_type=MessageType.TRAIN)
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, "accuracy": 0.5})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=msg)


def test_aggregate_train_drops_rejected_replies_and_records_them():
    strategy, full = _checked_strategy()
    strategy.selections = {0: ("l0.m0", "l0.m3"), 1: ("l0.m1", "l0.m3")}
    for pid in (0, 1):
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 10, {})
        strategy._by_node[100 + pid] = pid
        strategy.importance[pid] = {"l0.m0": 0.5, "l0.m1": 0.5, "l0.m2": 0.0, "l0.m3": 0.0}
        strategy.ledger.completed.add(pid)
    good = _reply_arrays(full, ("l0.m0", "l0.m3"))
    good["head.bias"] = Array(_f32(1.0, 2.0, 3.0, 4.0))
    bad = _reply_arrays(full, ("l0.m0",))  # device 1 was not sent l0.m0
    new, metrics = strategy.aggregate_train(1, [_train_reply(strategy, 0, good), _train_reply(strategy, 1, bad)])
    assert [f["partition_id"] for f in strategy.ledger.failures] == [1]
    assert strategy.ledger.failures[0]["phase"] == "train" and "l0.m0" in strategy.ledger.failures[0]["reason"]
    assert strategy.ledger.completed == {0}
    assert metrics["devices"] == 1 and metrics["accuracy"] == 0.5
    assert 0 < metrics["submodel_fraction"] < 1
    np.testing.assert_allclose(new["head.bias"].numpy(), [1.0, 2.0, 3.0, 4.0])  # the only accepted device
    for key in ("layers.0.modules.m1.0.weight", "layers.0.active"):
        assert new[key].numpy().tobytes() == full[key].numpy().tobytes()


def test_aggregate_train_with_no_valid_reply_keeps_the_cloud():
    strategy, full = _checked_strategy()
    strategy.devices[0] = DeviceInfo(0, 100, 10, {})
    strategy._by_node[100] = 0
    strategy.importance[0] = {}
    new, _ = strategy.aggregate_train(1, [_train_reply(strategy, 0, None)])
    assert new is None and strategy.ledger.failures[0]["reason"] == "rejected reply: no arrays"


# --------------------------------------------------------------------------- a full round on a fake grid
def _device_data(slot, pid):
    g = torch.Generator().manual_seed(1000 * pid + slot)
    return DeviceTensors(
        train_x=torch.randn(12, 3, 8, 8, generator=g), train_y=torch.randint(0, 4, (12,), generator=g),
        test_x=torch.randn(6, 3, 8, 8, generator=g), test_y=torch.randint(0, 4, (6,), generator=g),
    )


def _client(pid, memory):
    budget = {"flops_per_s": 1e9, "memory_bytes": memory, "uplink_bps": 1e6, "downlink_bps": 1e6}
    return ECLMClient(Device(
        partition_id=pid, seed=0, budget=budget, data=lambda slot: _device_data(slot, pid),
        num_examples=lambda slot: 12, build_model=lambda: build_modular("modular_mlp", **MLP),
        train=TrainSettings(epochs=1, lr=1e-2, batch_size=6), flops_per_sample=1e5,
        load_factor=lambda r: 1.0, is_available=lambda r: True, slot_of_round=lambda r: 0,
        options={"round_budget_s": 10.0, "local_adjust": True},
    ))


class _FakeGrid:
    """Hands every message to the in-process handler of its destination node."""

    def __init__(self, handlers):
        self.handlers = handlers

    def send_and_receive(self, messages, timeout=None):
        return [self.handlers[m.metadata.dst_node_id].handle(m.metadata.message_type, m, None) for m in messages]


def _round(memories):
    from experiments.algorithms.eclm import catalog

    cloud = build_modular("modular_mlp", **MLP)
    cat = catalog(cloud, 6)
    strategy = ECLM(catalog=cat, layer_sizes=cloud.layer_sizes(), samples_per_device=12, epochs=1,
                    round_budget_s=10.0, size_cap=1.0, per_round=len(memories), seed=0,
                    expected_devices=len(memories))
    handlers = {}
    for pid, memory in enumerate(memories):
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 12, dict(_client(pid, memory).device.budget))
        strategy._by_node[100 + pid] = pid
        handlers[100 + pid] = _client(pid, memory)
    grid = _FakeGrid(handlers)
    full = ArrayRecord(cloud.state_dict())
    messages = strategy.configure_train(1, full, ConfigRecord(), grid)
    replies = strategy.exchange(grid, list(messages), "train")
    new, metrics = strategy.aggregate_train(1, replies)
    return strategy, cat, full, messages, new, metrics


def test_one_round_profiles_derives_sends_and_aggregates_module_wise():
    # shared memory + one module fits device 1 only just; device 0 cannot hold the shared part
    from experiments.algorithms.eclm import catalog

    cat = catalog(build_modular("modular_mlp", **MLP), 6)
    one_module = cat.shared_cost[2] + max(c[2] for c in cat.costs.values())
    strategy, cat, full, messages, new, metrics = _round([cat.shared_cost[2] / 2, one_module * 1.0001, 1e12])
    assert set(strategy.importance) == {0, 1, 2}
    assert all(abs(sum(imp.values()) - 1.0) < 1e-5 for imp in strategy.importance.values())
    assert [f["phase"] for f in strategy.ledger.failures] == ["derive"]
    assert strategy.ledger.failures[0]["partition_id"] == 0
    # device 1: its most important shrunk module plus the residual bypass m3 (costs nothing)
    shrunk = ("l0.m0", "l0.m1", "l0.m2")
    best = max(shrunk, key=strategy.importance[1].get)
    assert strategy.selections[1] == tuple(sorted((best, "l0.m3")))
    assert strategy.selections[2] == ("l0.m0", "l0.m1", "l0.m2", "l0.m3")
    for msg in messages:
        pid = strategy._by_node[msg.metadata.dst_node_id]
        ids = strategy.selections[pid]
        assert msg.content["config"]["modules"] == ",".join(ids)
        owners = {module_of_key(k) for k in msg.content["arrays"].keys()} - {None}
        assert owners == {i for i in ids if i != "l0.m3"}  # residual modules have no tensors
    assert strategy.ledger.completed == {1, 2} and metrics["devices"] == 2
    held = set(strategy.selections[1]) | set(strategy.selections[2])
    for key in full.keys():
        owner = module_of_key(key)
        same = new[key].numpy().tobytes() == full[key].numpy().tobytes()
        if key.endswith(".active") or (owner is not None and owner not in held):
            assert same, key
    assert new["head.weight"].numpy().tobytes() != full["head.weight"].numpy().tobytes()


def test_one_round_is_deterministic():
    first = _round([1e12, 1e12])
    again = _round([1e12, 1e12])
    assert first[0].selections == again[0].selections
    assert all(first[4][k].numpy().tobytes() == again[4][k].numpy().tobytes() for k in first[4].keys())
