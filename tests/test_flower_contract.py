"""Flower's Strategy contract kept: signatures, records as return types, the weight key, start's Result.

Flower's own ``FedAvg`` aggregates the replies of the project's FedAvg client to the project's
result; ``start`` resumes after a checkpointed round and calls the after-round hook.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Result, Strategy

from clients.base import Device, DeviceTensors
from clients.local import LocalTrainingClient
from models.catalog import build_model
from models.training import TrainSettings
from strategies.an import AdaptiveNet
from strategies.base import EdgeCloudStrategy
from strategies.cema import CEMA
from strategies.eclm import ECLM
from strategies.elastic import ElasticDNN
from strategies.fedavg import FedAvg
from strategies.heterofl import FedRolex, HeteroFL
from strategies.local import LocalAdaptation
from strategies.none import NoAdaptation
from strategies.tta import OnlineTTA

torch.set_num_threads(1)
STRATEGIES = (EdgeCloudStrategy, FedAvg, ECLM, HeteroFL, FedRolex, CEMA, OnlineTTA, ElasticDNN, AdaptiveNet,
              LocalAdaptation, NoAdaptation)
FLOWER_METHODS = ("start", "configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e12, "uplink_bps": 1e6, "downlink_bps": 1e7, "device_class": "x"}


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_every_strategy_keeps_flowers_signatures_and_return_types(cls):
    for name in FLOWER_METHODS:
        ours = inspect.signature(getattr(cls, name), eval_str=True)
        assert ours == inspect.signature(getattr(Strategy, name)), f"{cls.__name__}.{name}: {ours}"


# --------------------------------------------------------------------------- a small FedAvg fleet
def _data(train_size):
    def data(slot):
        g = torch.Generator().manual_seed(slot)
        return DeviceTensors(
            train_x=torch.randn(train_size, 3, 16, 16, generator=g), train_y=torch.randint(0, 4, (train_size,), generator=g),
            test_x=torch.randn(6, 3, 16, 16, generator=g), test_y=torch.randint(0, 4, (6,), generator=g),
        )
    return data


def _cnn():
    return build_model("cnn", num_classes=4, width=4)


def _client(pid, train_size):
    return LocalTrainingClient(Device(
        partition_id=pid, seed=0, budget=BUDGET, data=_data(train_size), num_examples=lambda slot: train_size,
        build_model=_cnn, train=TrainSettings(epochs=1, lr=1e-2, batch_size=4), flops_per_sample=1e6,
        load_factor=lambda r: 1.0, is_available=lambda r: True, slot_of_round=lambda r: 0,
    ))


class _InProcessGrid:
    """Node ``100 + pid`` runs device ``pid``'s handler; every message is answered in process."""

    def __init__(self, handlers):
        self.handlers = handlers

    def get_node_ids(self):
        return sorted(self.handlers)

    def send_and_receive(self, messages, timeout=None):
        return [self.handlers[m.metadata.dst_node_id].handle(m.metadata.message_type, m, None) for m in messages]


def _fleet(sizes):
    return _InProcessGrid({100 + pid: _client(pid, size) for pid, size in enumerate(sizes)})


def _initial():
    torch.manual_seed(0)
    return ArrayRecord(_cnn().state_dict())


def _train_replies(sizes):
    """The project's FedAvg after discovery, and its devices' replies to round 1 (checked by exchange)."""
    strategy = FedAvg(per_round=len(sizes), seed=0, expected_devices=len(sizes))
    grid = _fleet(sizes)
    strategy.discover(grid)
    messages = list(strategy.configure_train(1, _initial(), ConfigRecord(), grid))
    return strategy, strategy.exchange(grid, messages, "train")


def test_flowers_fedavg_aggregates_the_projects_replies_to_the_same_arrays():
    strategy, replies = _train_replies([12, 12])  # equal weights 1/2: both sums round once, bit for bit
    ours, _ = strategy.aggregate_train(1, replies)
    theirs, metrics = FlowerFedAvg().aggregate_train(1, replies)
    assert set(theirs.keys()) == set(ours.keys())
    for key in ours.keys():
        mine, flower = ours[key].numpy(), theirs[key].numpy()
        if np.issubdtype(mine.dtype, np.floating):
            assert flower.dtype == mine.dtype and np.array_equal(flower, mine), key
        else:  # BatchNorm's num_batches_tracked: Flower keeps the float mean, the project rounds it
            assert flower == mine, key
    assert metrics["accuracy"] == pytest.approx(np.mean([r.content["metrics"]["accuracy"] for r in replies]))


def test_flowers_fedavg_weights_the_projects_replies_by_num_examples():
    strategy, replies = _train_replies([4, 12])  # weights 1/4 and 3/4
    ours, _ = strategy.aggregate_train(1, replies)
    theirs, _ = FlowerFedAvg().aggregate_train(1, replies)
    first, second = (r.content["arrays"] for r in replies)
    key = "classifier.weight"
    by_hand = 0.25 * first[key].numpy().astype(np.float64) + 0.75 * second[key].numpy().astype(np.float64)
    np.testing.assert_allclose(ours[key].numpy(), by_hand, rtol=1e-6)
    # Flower sums in float32, the project in float64: equal up to float32 rounding
    np.testing.assert_allclose(theirs[key].numpy(), ours[key].numpy(), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- start: Result, hooks, resume
def _run(sizes, num_rounds, *, state=None, after=0, arrays=None, config=None):
    """A seeded FedAvg run of 2-device cohorts: (strategy, Result, round records, after-round calls)."""
    records, hooked = [], []
    strategy = FedAvg(per_round=2, seed=3, expected_devices=len(sizes), on_round=records.append,
                      after_round=lambda r, a: hooked.append((r, a)))
    if state is not None:
        strategy.load_state_dict(state)
        strategy.resume_after(after)

    def evaluate_fn(server_round, cloud):
        return MetricRecord({"accuracy": float(server_round) / 10})

    result = strategy.start(_fleet(sizes), arrays or _initial(), num_rounds, timeout=5.0, train_config=config,
                            evaluate_fn=evaluate_fn)
    return strategy, result, records, hooked


def test_start_returns_flowers_result_and_calls_the_hooks_after_each_round():
    _, result, records, hooked = _run([8, 8, 8], 2)
    assert isinstance(result, Result)
    assert [r for r, _ in hooked] == [1, 2] and [r["round"] for r in records] == [1, 2]
    assert result.arrays is hooked[-1][1]  # the cloud model after the last round
    assert sorted(result.train_metrics_clientapp) == [1, 2] == sorted(result.evaluate_metrics_clientapp)
    assert {r: m["accuracy"] for r, m in result.evaluate_metrics_serverapp.items()} == {1: 0.1, 2: 0.2}
    assert [r["global_accuracy"] for r in records] == [0.1, 0.2]
    assert result.train_metrics_clientapp[1]["devices"] == 2 == records[0]["train_devices"]


def test_a_resumed_start_runs_only_the_rounds_after_the_checkpoint_and_gives_the_same_numbers():
    _, full, steady_records, _ = _run([8, 8, 8], 2)
    interrupted, after_one, _, _ = _run([8, 8, 8], 1)  # its state and arrays: the checkpoint of round 1
    _, resumed, resumed_records, resumed_hooked = _run([8, 8, 8], 2, state=interrupted.state_dict(), after=1,
                                                        arrays=after_one.arrays)
    assert [r for r, _ in resumed_hooked] == [2] and sorted(resumed.train_metrics_clientapp) == [2]
    assert all(np.array_equal(resumed.arrays[k].numpy(), full.arrays[k].numpy()) for k in full.arrays.keys())
    host_times = {"wall_time_s", "train_wall_time_s"}
    assert [{k: v for k, v in r.items() if k not in host_times} for r in resumed_records] == [
        {k: v for k, v in steady_records[1].items() if k not in host_times}
    ]


def test_resume_after_takes_the_last_finished_round():
    strategy = FedAvg(per_round=1, seed=0, expected_devices=1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="last finished round"):
            strategy.resume_after(bad)


def test_the_runs_train_config_reaches_every_train_message():
    strategy = FedAvg(per_round=2, seed=0, expected_devices=2)
    grid = _fleet([8, 8])
    strategy.discover(grid)
    messages = strategy.with_run_config(strategy.configure_train(1, _initial(), ConfigRecord(), grid),
                                        ConfigRecord({"lr-scale": 0.5}))
    assert [dict(m.content["config"]) for m in messages] == [{"round": 1, "lr-scale": 0.5}] * 2
    _, result, _, _ = _run([8, 8], 1, config=ConfigRecord({"lr-scale": 0.5}))
    assert result.train_metrics_clientapp[1]["devices"] == 2  # the devices read and ignored the extra entry
    with pytest.raises(ValueError, match=r"sets \['round'\], which FedAvg sets itself"):
        strategy.with_run_config(strategy.configure_train(1, _initial(), ConfigRecord(), grid),
                                 ConfigRecord({"round": 9}))


def test_an_evaluate_fn_that_breaks_flowers_contract_is_named():
    strategy = FedAvg(per_round=1, seed=0, expected_devices=1)
    grid = _fleet([8])
    with pytest.raises(TypeError, match="evaluate_fn returned a dict; return a MetricRecord"):
        strategy.start(grid, _initial(), 1, timeout=5.0, evaluate_fn=lambda r, a: {"accuracy": 0.5})


def test_replies_carry_flowers_weight_key_and_one_record_of_each_kind():
    _, replies = _train_replies([8, 8])
    for reply in replies:
        content = reply.content
        assert list(content.array_records) == ["arrays"] and list(content.metric_records) == ["metrics"]
        assert content["metrics"]["num-examples"] == 8 and "num_examples" not in content["metrics"]


def test_discovery_reads_the_weight_key():
    strategy = FedAvg(per_round=1, seed=0, expected_devices=2)
    strategy.discover(_fleet([5, 9]))
    assert {pid: info.num_examples for pid, info in strategy.devices.items()} == {0: 5, 1: 9}
