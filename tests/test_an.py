"""AN (AdaptiveNet) on hand-built devices: path within budget, declines, training data only, no arrays."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from clients.an import AdaptiveNetClient, pick_candidates, validation_split
from clients.base import DEVICE_DECLINED, MALFORMED_MESSAGE, Device, DeviceTensors
from models.catalog import build_model
from models.costs import parameter_bytes
from models.training import TrainSettings
from strategies.an import AdaptiveNet
from strategies.base import DeviceInfo
from strategies.metrics import metric_values

torch.set_num_threads(1)
BATCH = 8
EPOCHS = 1
TRAIN, TEST = 20, 8
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e12, "uplink_bps": 1e6, "downlink_bps": 1e7, "device_class": "x"}


def _supernet():
    torch.manual_seed(0)
    return build_model("multibranch_cnn", num_classes=4, width=4)


def _data(slot, permute_test=False):
    g = torch.Generator().manual_seed(slot)
    y = torch.arange(TRAIN + TEST) % 4
    x = torch.randn(TRAIN + TEST, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1).float()
    test_y = y[TRAIN:]
    if permute_test:
        test_y = test_y[torch.randperm(TEST, generator=torch.Generator().manual_seed(9))] + 1
    return DeviceTensors(x[:TRAIN], y[:TRAIN], x[TRAIN:], test_y % 4)


def _device(memory=1e12, load=2.0, model="multibranch_cnn", permute_test=False):
    return Device(
        partition_id=3,
        seed=0,
        budget={**BUDGET, "memory_bytes": memory},
        data=lambda slot: _data(slot, permute_test),
        num_examples=lambda slot: TRAIN,
        build_model=lambda: build_model(model, num_classes=4, width=4),
        train=TrainSettings(epochs=EPOCHS, lr=1e-3, batch_size=BATCH),
        flops_per_sample=1e6,
        load_factor=lambda r: load,
        is_available=lambda r: True,
        slot_of_round=lambda r: 0,
    )


def _message(compute_budget_s=None):
    config = {"round": 2} if compute_budget_s is None else {"round": 2, "compute_budget_s": compute_budget_s}
    content = RecordDict({"arrays": ArrayRecord(_supernet().state_dict()), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _train(device, msg=None, **kwargs):
    return AdaptiveNetClient(device, **kwargs).handle("train", msg or _message(), context=None)


def _path(reply):
    return tuple(reply.content["path"]["path"])


def test_reply_has_metrics_and_the_path_but_no_arrays():
    reply = _train(_device())
    assert reply.has_content() and not reply.content.array_records
    metrics = reply.content["metrics"]
    net = _supernet()
    path = net.check_path(_path(reply))
    assert reply.content["path"]["label"] == "-".join(map(str, path))
    cost = net.path_cost(path, BATCH)
    assert metrics["path_bytes"] == cost.bytes and metrics["train_memory_bytes"] == cost.train_memory_bytes
    assert metrics["num-examples"] == TRAIN and metrics["samples_trained"] == TRAIN * EPOCHS
    assert metrics["paths_fitting"] == 36 and metrics["paths_evaluated"] == 36  # no limit: exhaustive search
    # search: 36 candidates x (4 validation + 16 recalibration samples) forward passes; training:
    # 20 samples x the path's own training FLOPs; both at 1e9 FLOP/s slowed by load 2
    search_flops = sum(net.forward_flops(p) for p in net.all_paths()) * (4 + 16)
    assert metrics["search_time_s"] == pytest.approx(search_flops / 1e9 * 2)
    assert metrics["compute_time_s"] == pytest.approx((search_flops + cost.flops_per_sample * TRAIN) / 1e9 * 2)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["accuracy"] * TEST == round(metrics["accuracy"] * TEST)


def test_choice_is_deterministic():
    a, b = _train(_device()), _train(_device())
    assert _path(a) == _path(b)
    assert dict(a.content["metrics"]) | {"wall_time_s": 0} == dict(b.content["metrics"]) | {"wall_time_s": 0}


def test_memory_budget_limits_the_path():
    net = _supernet()
    limit = net.path_cost((1, 1, 1), BATCH).train_memory_bytes
    reply = _train(_device(memory=limit))
    assert reply.has_content()
    assert reply.content["metrics"]["train_memory_bytes"] <= limit
    assert _path(reply) in net.paths_within(BATCH, limit)
    assert reply.content["metrics"]["paths_fitting"] == len(net.paths_within(BATCH, limit)) < 36


def test_device_declines_when_no_path_fits_its_memory():
    smallest = _supernet().path_cost((2, 2, 3), BATCH).train_memory_bytes
    reply = _train(_device(memory=smallest - 1))
    assert reply.has_error() and reply.error.code == DEVICE_DECLINED
    assert "no branch combination fits" in reply.error.reason and str(smallest) in reply.error.reason


def test_compute_allowance_from_the_message_limits_the_path():
    net = _supernet()
    download_s = parameter_bytes(net) / BUDGET["downlink_bps"]
    free = _train(_device())
    search_s = free.content["metrics"]["search_time_s"]
    # allowance just enough for the search plus training the (1, 1, 1) path on 20 samples at load 2
    train_s = net.path_cost((1, 1, 1), BATCH).flops_per_sample * TRAIN / 1e9 * 2
    allowance = download_s + search_s * 1.001 + train_s
    reply = _train(_device(), _message(compute_budget_s=allowance))
    metrics = reply.content["metrics"]
    assert metrics["compute_time_s"] <= allowance - download_s
    assert net.path_cost(_path(reply), BATCH).flops_per_sample <= net.path_cost((1, 1, 1), BATCH).flops_per_sample
    assert metrics["paths_fitting"] == 36  # before the search is charged every path's training fits
    assert metrics["paths_evaluated"] < 36  # after it, the larger paths no longer do


def test_handler_default_allowance_applies_when_the_message_has_none_and_zero_declines():
    reply = _train(_device(), compute_budget_s=0.0)
    assert reply.has_error() and reply.error.code == DEVICE_DECLINED and "no branch combination" in reply.error.reason
    reply = _train(_device(), _message(compute_budget_s=0.0), compute_budget_s=None)
    assert reply.has_error() and reply.error.code == DEVICE_DECLINED


def test_choice_uses_training_data_only():
    honest = _train(_device())
    scrambled = _train(_device(permute_test=True))
    assert _path(honest) == _path(scrambled)
    assert honest.content["metrics"]["val_accuracy"] == scrambled.content["metrics"]["val_accuracy"]
    assert not torch.equal(_data(0).test_y, _data(0, permute_test=True).test_y)


def test_plain_network_is_a_malformed_message_not_a_crash():
    device = _device(model="cnn")
    msg = _message()
    msg.content["arrays"] = ArrayRecord(build_model("cnn", num_classes=4, width=4).state_dict())
    reply = AdaptiveNetClient(device).handle("train", msg, context=None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and "multibranch_cnn" in reply.error.reason


def test_validation_split_by_hand():
    fit, val = validation_split(10, 0.2, seed=1)
    assert len(val) == 2 and len(fit) == 8 and sorted([*fit, *val]) == list(range(10))
    assert np.array_equal(val, validation_split(10, 0.2, seed=1)[1])
    one_fit, one_val = validation_split(1, 0.2, seed=1)
    assert list(one_fit) == [0] and list(one_val) == [0]
    with pytest.raises(ValueError, match="must be in"):
        validation_split(10, 1.0, seed=1)


def test_pick_candidates_is_exhaustive_up_to_the_limit_then_seeded():
    paths = [(i,) for i in range(10)]
    assert pick_candidates(paths, 10, seed=0) == paths
    picked = pick_candidates(paths, 4, seed=0)
    assert len(picked) == 4 and picked == sorted(picked) and picked == pick_candidates(paths, 4, seed=0)
    with pytest.raises(ValueError, match="max_candidates"):
        pick_candidates(paths, 0, seed=0)


def _strategy(**kwargs):
    strategy = AdaptiveNet(per_round=2, seed=0, expected_devices=2, **kwargs)
    for pid in (0, 1):
        strategy.devices[pid] = DeviceInfo(pid, node_id=10 + pid, num_examples=TRAIN, budget=BUDGET)
    return strategy


def test_strategy_sends_the_unchanged_supernet_and_the_deadline_as_allowance():
    arrays = ArrayRecord(_supernet().state_dict())
    messages = _strategy(deadline_s=30.0).configure_train(1, arrays, ConfigRecord(), grid=None)
    assert [m.metadata.dst_node_id for m in messages] == [10, 11]
    for msg in messages:
        assert msg.content["arrays"] is arrays
        assert msg.content["config"]["compute_budget_s"] == 30.0
    explicit = _strategy(deadline_s=30.0, compute_budget_s=5.0).configure_train(1, arrays, ConfigRecord(), None)
    assert explicit[0].content["config"]["compute_budget_s"] == 5.0
    assert "compute_budget_s" not in _strategy().configure_train(1, arrays, ConfigRecord(), None)[0].content["config"]
    with pytest.raises(ValueError, match="compute_budget_s"):
        _strategy(compute_budget_s=-1.0)


def test_strategy_keeps_the_supernet_and_averages_metrics_and_counts_paths():
    replies = [_train(_device()), _train(_device(memory=_supernet().path_cost((2, 2, 3), BATCH).train_memory_bytes))]
    arrays, record = _strategy().aggregate_train(1, replies)
    metrics = metric_values(record)
    assert arrays is None and metrics["devices"] == 2
    accs = [r.content["metrics"]["accuracy"] for r in replies]
    assert math.isclose(metrics["accuracy"], sum(accs) / 2)  # equal data sizes: plain mean
    labels = [r.content["path"]["label"] for r in replies]
    assert sum(metrics["paths"].values()) == 2 and set(metrics["paths"]) == set(labels)
    assert record["paths/"] == len(set(labels))  # the group in Flower's MetricRecord: its size, then its members
    assert all(record[f"paths/{label}"] == labels.count(label) for label in labels)
    assert "2-2-3" in metrics["paths"]
    assert _strategy().aggregate_train(1, []) == (None, None)


def test_device_declines_when_the_search_leaves_no_time_to_train():
    net = _supernet()
    download_s = parameter_bytes(net) / BUDGET["downlink_bps"]
    smallest_train_s = net.path_cost((2, 2, 3), BATCH).flops_per_sample * TRAIN / 1e9 * 2
    # enough to train the smallest path, not enough to also rank the candidates first
    reply = _train(_device(), _message(compute_budget_s=download_s + smallest_train_s * 1.01))
    assert reply.has_error() and reply.error.code == DEVICE_DECLINED and "path search" in reply.error.reason
