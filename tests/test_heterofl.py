"""HeteroFL / FedRolex: rate selection, sub-model messages, covering aggregation, the edge handler."""

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from clients.base import MALFORMED_MESSAGE, Device, DeviceTensors
from clients.heterofl import HeteroFLClient
from experiments.algorithms.heterofl import strategy_args
from experiments.config import from_dict
from experiments.data import to_tensor
from experiments.pretrain.networks import build_run_model
from experiments.schema import ConfigError
from models.batchnorm import reestimate_bn
from models.catalog import build_model
from models.training import TrainSettings, accuracy
from models.width.layers import RateCost, cost_key, costs_to_record, rate_costs, static_bn_statistics
from models.width.submodel import WIDTH_RATES, extract, sub_shapes
from strategies.base import DeviceInfo
from strategies.heterofl import FedRolex, HeteroFL, select_rate

torch.set_num_threads(1)

# Hand-made costs: (memory bytes, FLOPs per sample, model bytes) per rate.
COSTS = {
    1.0: RateCost(100.0, 10.0, 1000.0),
    0.5: RateCost(50.0, 4.0, 250.0),
    0.25: RateCost(20.0, 1.0, 60.0),
    0.125: RateCost(10.0, 0.5, 20.0),
    0.0625: RateCost(5.0, 0.25, 10.0),
}
SAMPLES = 5  # per round (samples x epochs)


def _budget(memory=1e9, flops=10.0, up=1e6, down=1e6):
    return {"memory_bytes": memory, "flops_per_s": flops, "uplink_bps": up, "downlink_bps": down, "device_class": "x"}


# --------------------------------------------------------------------------- rate selection
def test_select_rate_picks_the_widest_rate_that_fits():
    # rate 1 needs 100 B > 60 B; rate 0.5: 50 B, 4 x 5 / 10 = 2 s compute, 250/100 + 250/100 = 5 s transfer
    assert select_rate(_budget(memory=60, up=100, down=100), COSTS, SAMPLES, 10.0) == (0.5, "")
    # slow link: rate 0.5 transfers 250/20 + 250/20 = 25 s > 10 s; rate 0.25: 6 s
    assert select_rate(_budget(up=20, down=20), COSTS, SAMPLES, 10.0) == (0.25, "")
    # slow chip: rate 1 computes 10 x 5 / 1 = 50 s, rate 0.5 20 s, rate 0.25 5 s
    assert select_rate(_budget(flops=1.0), COSTS, SAMPLES, 10.0) == (0.25, "")
    assert select_rate(_budget(), COSTS, SAMPLES, 10.0) == (1.0, "")


def test_select_rate_says_why_nothing_fits():
    rate, reason = select_rate(_budget(memory=4), COSTS, SAMPLES, 10.0)
    assert rate is None and "memory" in reason and "0.0625" in reason
    rate, reason = select_rate(_budget(), COSTS, SAMPLES, 10.0, rates=(1.0,))
    assert rate == 1.0 and reason == ""


def test_strategy_rejects_bad_settings():
    base = dict(per_round=2, seed=0, expected_devices=2)
    with pytest.raises(ValueError, match="subset of"):
        HeteroFL(rates=(0.3,), **base)
    with pytest.raises(ValueError, match="round_budget_s"):
        HeteroFL(round_budget_s=0.0, **base)
    with pytest.raises(ValueError, match="budget_quantile"):
        HeteroFL(budget_quantile=1.5, **base)


@pytest.mark.parametrize("bad, message", [
    ({"clip_grad_norm": 0.0}, "algorithm.heterofl.clip_grad_norm must be a finite number > 0 or null"),
    ({"clip_grad_norm": float("inf")}, "algorithm.heterofl.clip_grad_norm must be a finite number > 0 or null"),
    ({"label_split": "yes"}, "algorithm.heterofl.label_split must be true or false"),
])
def test_config_rejects_bad_label_and_clip_settings(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"algorithm": {"name": "heterofl", "heterofl": bad}})
    options = from_dict({"algorithm": {"name": "heterofl", "heterofl": {"clip_grad_norm": None}}}).algorithm.options
    assert options.clip_grad_norm is None and options.label_split and options.label_mask  # official defaults


class _ProxyData:
    """The two things the cloud's sBN reads of a dataset: its proxy part and its shapes."""

    num_classes, image_shape = 10, (3, 16, 16)

    def __init__(self, images):
        self.images = images

    def proxy(self):
        return self.images, np.zeros(len(self.images), np.int64)


def test_the_cloud_measures_global_sbn_on_its_proxy_as_its_pre_training_did():
    cfg = from_dict({"algorithm": {"name": "heterofl"}, "model": {"name": "cnn", "width": 4}})
    images = np.random.default_rng(0).integers(0, 256, (100, 16, 16, 3), dtype=np.uint8)
    model = build_run_model(cfg.model, 10, 3, seed=cfg.seed)
    reestimate_bn(model, to_tensor(images), cfg.pretrain.batch_size, even_batches=True)  # cloud_training's last step
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    measured = strategy_args(cfg, model, _ProxyData(images))["cloud_statistics"](state)
    assert sorted(measured) == sorted(k for k in state if k.endswith(("running_mean", "running_var")))
    assert all(np.array_equal(measured[k], state[k]) for k in measured)  # an unchanged model keeps its statistics
    assert "cloud_statistics" not in strategy_args(cfg, model, _ProxyData(images[:0]))  # no proxy: the devices'


# --------------------------------------------------------------------------- cloud, hand-built
def _toy_state():
    return {
        "stem.weight": np.arange(8, dtype=np.float32).reshape(4, 2),
        "bn.weight": np.array([10, 20, 30, 40], np.float32),
        "head.weight": np.ones((3, 4), np.float32),
        "head.bias": np.array([1, 2, 3], np.float32),
    }


def _strategy(cls=HeteroFL, budgets=None, **kwargs):
    budgets = budgets or {0: _budget(), 1: _budget(memory=60), 2: _budget(memory=1)}
    strategy = cls(per_round=len(budgets), seed=0, expected_devices=len(budgets), round_budget_s=10.0, **kwargs)
    for pid, budget in budgets.items():
        reported = {**budget, **costs_to_record(COSTS, SAMPLES)}
        strategy.devices[pid] = DeviceInfo(pid, 1000 + pid, 20 * (pid + 1), reported)
        strategy._by_node[1000 + pid] = pid
    return strategy


def _arrays(state):
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def _messages(strategy, server_round=1):
    return strategy.configure_train(server_round, _arrays(_toy_state()), ConfigRecord(), None)


def test_configure_train_sends_each_device_its_prefix_submodel_and_skips_the_unfit():
    strategy = _strategy()
    messages = {strategy._by_node[m.metadata.dst_node_id]: m for m in _messages(strategy)}
    assert sorted(messages) == [0, 1] and strategy.assigned == {0: 1.0, 1: 0.5}
    half = messages[1].content["arrays"]
    np.testing.assert_array_equal(half["stem.weight"].numpy(), [[0, 1], [2, 3]])  # prefix rows, all inputs
    np.testing.assert_array_equal(half["head.weight"].numpy(), np.ones((3, 2)))  # all classes
    assert dict(messages[1].content["config"]) == {"round": 1, "rate": 0.5, "label_mask": True, "clip_grad_norm": 1.0}
    assert messages[0].content["arrays"]["bn.weight"].numpy().tolist() == [10, 20, 30, 40]
    [failure] = strategy.ledger.failures
    assert failure["partition_id"] == 2 and "no width rate fits" in failure["reason"]


def test_a_device_without_reported_costs_is_skipped_with_the_reason():
    strategy = _strategy()
    strategy.devices[1].budget = _budget()
    _messages(strategy)
    assert 1 not in strategy.assigned
    assert any("HeteroFLClient" in f["reason"] for f in strategy.ledger.failures if f["partition_id"] == 1)


def _reply(message, state, num_examples=10, classes=(0, 1, 2)):
    content = RecordDict({"arrays": _arrays(state), "metrics": MetricRecord({"num-examples": num_examples, "accuracy": 0.5})})
    if classes is not None:
        content["labels"] = ConfigRecord({"classes": list(classes)})
    return Message(content, reply_to=message)


def _round(strategy, bn_by_pid, server_round=1, num_examples=None, classes=None, head=None):
    """configure, reply with sub-models whose bn.weight (and head.bias) is given, aggregate; returns the new state."""
    replies = []
    for msg in _messages(strategy, server_round):
        pid = strategy._by_node[msg.metadata.dst_node_id]
        state = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        state["bn.weight"] = np.array(bn_by_pid[pid], np.float32)
        if head is not None:
            state["head.bias"] = np.array(head[pid], np.float32)
        replies.append(_reply(msg, state, (num_examples or {}).get(pid, 10), (classes or {}).get(pid, (0, 1, 2))))
        strategy.ledger.completed.add(pid)  # what exchange() does for a kept reply
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return {k: v.numpy() for k, v in arrays.items()}, metrics


def test_aggregate_train_is_the_plain_covering_average():
    state, metrics = _round(_strategy(), {0: [1, 2, 3, 4], 1: [5, 6]})
    np.testing.assert_allclose(state["bn.weight"], [3, 4, 3, 4])  # channels 0-1 by both, 2-3 by the full one
    np.testing.assert_array_equal(state["stem.weight"], _toy_state()["stem.weight"])  # unchanged values stay
    assert metrics["devices"] == 2 and metrics["accuracy"] == 0.5


def test_aggregate_train_can_weight_by_examples():
    state, _ = _round(_strategy(weight_by_examples=True), {0: [1, 2, 3, 4], 1: [5, 6]}, num_examples={0: 10, 1: 30})
    np.testing.assert_allclose(state["bn.weight"], [(10 + 150) / 40, (20 + 180) / 40, 3, 4])


def test_aggregate_train_merges_classifier_rows_by_the_classes_the_devices_name():
    bn, classes, head = {0: [1, 2, 3, 4], 1: [5, 6]}, {0: (0, 2), 1: [2]}, {0: [10, 20, 30], 1: [40, 50, 60]}
    state, _ = _round(_strategy(), bn, classes=classes, head=head)
    np.testing.assert_allclose(state["head.bias"], [10, 2, 45])  # class 1: nobody holds it, keeps 2
    np.testing.assert_allclose(state["bn.weight"], [3, 4, 3, 4])  # everything else: the covering average
    everyone, _ = _round(_strategy(label_split=False), bn, classes=classes, head=head)
    np.testing.assert_allclose(everyone["head.bias"], [25, 35, 45])


def test_aggregate_train_rejects_replies_without_valid_classes_when_splitting_labels():
    strategy = _strategy()
    [full_msg, half_msg] = _messages(strategy)
    strategy.ledger.completed.update({0, 1})
    half = {k: v.numpy() for k, v in half_msg.content["arrays"].items()}
    replies = [_reply(full_msg, _toy_state(), classes=None), _reply(half_msg, half, classes=(0, 3))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None and strategy.ledger.completed == set()
    reasons = {f["partition_id"]: f["reason"] for f in strategy.ledger.failures}
    assert "no 'labels' record naming the device's classes" in reasons[0]
    assert "bad classes: class 3 is not one of the classifier's 3 classes" in reasons[1]
    lenient = _strategy(label_split=False)
    [full_msg, _] = _messages(lenient)
    lenient.ledger.completed.add(0)
    arrays, _ = lenient.aggregate_train(1, [_reply(full_msg, _toy_state(), classes=None)])
    assert arrays is not None and lenient.ledger.completed == {0}


def test_messages_carry_the_training_asks_and_validate_them():
    strategy = _strategy(label_mask=False, clip_grad_norm=None)
    [msg, _] = _messages(strategy)
    assert dict(msg.content["config"]) == {"round": 1, "rate": 1.0, "label_mask": False}
    with pytest.raises(ValueError, match="clip_grad_norm"):
        HeteroFL(per_round=1, seed=0, expected_devices=1, clip_grad_norm=0.0)


def test_aggregate_train_rejects_a_reply_of_the_wrong_shape():
    strategy = _strategy()
    [full_msg, half_msg] = _messages(strategy)
    wrong = _reply(half_msg, {k: v.numpy() for k, v in full_msg.content["arrays"].items()})
    strategy.ledger.completed.update({0, 1})
    arrays, _ = strategy.aggregate_train(1, [_reply(full_msg, _toy_state()), wrong])
    assert 1 not in strategy.ledger.completed
    assert any("rejected reply: stem.weight has shape (4, 2)" in f["reason"] for f in strategy.ledger.failures)
    assert arrays is not None


class _StatisticsGrid:
    """Answers each statistics query with the (mean, var, training examples) given for its device."""

    def __init__(self, strategy, answers):
        self.strategy, self.answers, self.asked = strategy, answers, []

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            pid = self.strategy._by_node[msg.metadata.dst_node_id]
            self.asked.append((pid, dict(msg.content["config"])))
            mean, var, n = self.answers[pid]
            stats = {"bn.running_mean": np.array(mean, np.float32), "bn.running_var": np.array(var, np.float32)}
            metrics = MetricRecord({"num-examples": 5, "num_train_examples": n, "accuracy": 0.9})
            replies.append(Message(RecordDict({"arrays": _arrays(stats), "metrics": metrics}), reply_to=msg))
        return replies


def _stats_cloud():
    stats = {"bn.running_mean": np.full(4, 9.0, np.float32), "bn.running_var": np.full(4, 7.0, np.float32)}
    state = {**_toy_state(), **stats}
    return _arrays(state)


def test_global_sbn_queries_and_pools_the_devices_statistics_before_they_score_the_model():
    strategy = _strategy(global_sbn=True)
    cloud = _stats_cloud()
    strategy.assigned, strategy.ledger.completed = {0: 1.0, 1: 0.5}, {0, 1, 2}
    grid = _StatisticsGrid(strategy, {0: ([0, 0, 0, 0], [1, 1, 1, 1], 10), 1: ([4, 4, 4, 4], [1, 1, 1, 1], 30)})
    messages = strategy.configure_evaluate(1, cloud, ConfigRecord(), grid)
    assert grid.asked == [(pid, {"round": 1, "rate": 1.0, "statistics": True}) for pid in (0, 1)]  # those that trained
    # mean (0 x 10 + 4 x 30) / 40 = 3; E[x^2] = (10 x 1 + 30 x 17) / 40 = 13; var 13 - 9 = 4
    np.testing.assert_allclose(cloud["bn.running_mean"].numpy(), [3, 3, 3, 3])
    np.testing.assert_allclose(cloud["bn.running_var"].numpy(), [4, 4, 4, 4])
    # then the same devices score the full model with those global statistics, not their own sBN
    assert sorted(strategy._by_node[m.metadata.dst_node_id] for m in messages) == [0, 1]
    assert dict(messages[0].content["config"]) == {"round": 1, "rate": 1.0, "static_bn": False, "label_mask": True}
    assert messages[0].content["arrays"]["stem.weight"].numpy().shape == (4, 2)  # the full model
    np.testing.assert_allclose(messages[0].content["arrays"]["bn.running_var"].numpy(), [4, 4, 4, 4])
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "accuracy": a})}), reply_to=m)
               for m, n, a in zip(messages, (10, 30), (0.2, 0.6))]
    assert strategy.aggregate_evaluate(1, replies)["accuracy"] == pytest.approx(0.5)  # (2 + 18) / 40
    assert _strategy().configure_evaluate(1, cloud, ConfigRecord(), None) == []  # off by default


def _cloud_statistics(state):
    """A stand-in for the cloud's sBN: mean = the BN weight + 1, variance 2."""
    return {"bn.running_mean": np.asarray(state["bn.weight"]) + 1.0, "bn.running_var": np.full(4, 2.0)}


def test_the_clouds_statistics_replace_the_pooled_ones_after_aggregation():
    bn = {0: [1, 2, 3, 4], 1: [5, 6]}
    strategy = _strategy(cloud_statistics=_cloud_statistics)
    replies = []
    for msg in strategy.configure_train(1, _stats_cloud(), ConfigRecord(), None):
        pid = strategy._by_node[msg.metadata.dst_node_id]
        state = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        state["bn.weight"] = np.array(bn[pid], np.float32)
        replies.append(_reply(msg, state))
        strategy.ledger.completed.add(pid)
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["bn.running_mean"].numpy(), [4, 5, 4, 5])  # merged weight [3, 4, 3, 4] + 1
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), [2, 2, 2, 2])
    assert arrays["bn.running_var"].numpy().dtype == np.float32


def test_global_sbn_with_the_clouds_statistics_sends_them_without_a_query():
    strategy = _strategy(global_sbn=True, cloud_statistics=_cloud_statistics)
    strategy.assigned, strategy.ledger.completed = {0: 1.0, 1: 0.5}, {0, 1}
    cloud = _stats_cloud()
    messages = strategy.configure_evaluate(1, cloud, ConfigRecord(), None)  # no grid needed: nothing is asked
    assert [dict(m.content["config"]) for m in messages] == [
        {"round": 1, "rate": 1.0, "static_bn": False, "label_mask": True}] * 2
    assert messages[0].content["arrays"] is cloud  # as aggregated: the statistics came with aggregation


def test_cloud_statistics_must_fit_the_model():
    strategy = _strategy(cloud_statistics=lambda state: {"bn.running_mean": np.zeros(3)})
    with pytest.raises(ValueError, match="'bn.running_mean' \\(3,\\)"):
        strategy._cloud_measured({k: v.numpy() for k, v in _stats_cloud().items()})


def test_fedrolex_window_rolls_one_channel_per_round_and_wraps():
    budgets = {0: _budget(memory=60)}  # rate 0.5: 2 of 4 channels
    strategy = _strategy(FedRolex, budgets)
    # round t keeps torch.roll(arange(4), t - 1)[:2] (FedRolex split_model)
    for server_round, kept in [(1, [0, 1]), (2, [3, 0]), (3, [2, 3]), (4, [1, 2]), (5, [0, 1])]:
        [msg] = _messages(strategy, server_round)
        assert msg.content["config"]["offset"] == server_round - 1
        assert msg.content["arrays"]["bn.weight"].numpy().tolist() == [10 * (c + 1) for c in kept]
    state, _ = _round(_strategy(FedRolex, budgets), {0: [7, 8]}, server_round=2)
    np.testing.assert_allclose(state["bn.weight"], [8, 20, 30, 7])  # window [3, 0] written back in place


def test_default_round_budget_is_the_fleets_median_full_model_time():
    # full model: compute 10 x 5 / flops s; transfer 1000 / 1e6 x 2 (negligible)
    budgets = {0: _budget(flops=50.0), 1: _budget(flops=10.0), 2: _budget(flops=2.0)}  # 1 s, 5 s, 25 s
    strategy = _strategy(budgets=budgets)
    strategy.round_budget_s = None
    _messages(strategy)
    assert strategy.budget_s() == pytest.approx(5.0)  # max(compute 5 s, transfer 0.002 s) of the median device
    assert strategy.assigned == {0: 1.0, 1: 1.0, 2: 0.25}  # rate 0.5 takes 4 x 5 / 2 = 10 s > 5 s
    deadline = _strategy(budgets=budgets)
    deadline.round_budget_s, deadline.deadline_s = None, 30.0
    assert deadline.budget_s() == 30.0


# --------------------------------------------------------------------------- the edge handler
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e7, "device_class": "x"}
WIDTH = 4


def _net():
    return build_model("cnn", num_classes=10, width=WIDTH)


def _data(slot):
    g = torch.Generator().manual_seed(slot)
    return DeviceTensors(
        train_x=torch.randn(12, 3, 16, 16, generator=g), train_y=torch.randint(0, 10, (12,), generator=g),
        test_x=torch.randn(6, 3, 16, 16, generator=g), test_y=torch.randint(0, 10, (6,), generator=g),
    )


def _device(pid=7, budget=BUDGET):
    return Device(
        partition_id=pid, seed=0, budget=budget, data=_data, num_examples=lambda slot: 12, build_model=_net,
        train=TrainSettings(epochs=2, lr=1e-3, batch_size=4), flops_per_sample=1e6,
        load_factor=lambda r: 2.0, is_available=lambda r: True, slot_of_round=lambda r: 0,
    )


def _train_message(rate, arrays_rate=None, kind=MessageType.TRAIN):
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in _net().state_dict().items()}
    cut = extract(state, rate if arrays_rate is None else arrays_rate)
    content = RecordDict({"arrays": _arrays(cut), "config": ConfigRecord({"round": 3, "rate": rate})})
    return Message(content, dst_node_id=1, message_type=kind)


def test_client_trains_the_submodel_and_replies_with_its_shapes():
    reply = HeteroFLClient(_device()).handle("train", _train_message(0.5), context=None)
    assert reply.has_content()
    full_shapes = {k: tuple(v.shape) for k, v in _net().state_dict().items()}
    got = {k: tuple(v.shape) for k, v in reply.content["arrays"].items()}
    assert got == sub_shapes(full_shapes, 0.5)
    metrics = reply.content["metrics"]
    assert metrics["rate"] == 0.5 and metrics["num-examples"] == 12 and metrics["samples_trained"] == 24
    flops = rate_costs(_net, (3, 16, 16), 4, rates=(0.5,))[0.5].flops_per_sample
    assert metrics["compute_time_s"] == pytest.approx(flops * 24 / 1e9 * 2.0)  # sub-model FLOPs x load 2
    assert metrics["accuracy"] * 6 == round(metrics["accuracy"] * 6)
    # static BN: running stats were recomputed on the local data (the message carried zeros / ones)
    assert not np.allclose(reply.content["arrays"]["features.0.1.running_mean"].numpy(), 0.0)


def test_client_reply_names_the_classes_of_its_training_data():
    reply = HeteroFLClient(_device()).handle("train", _train_message(0.5), context=None)
    assert reply.content["labels"]["classes"] == sorted(set(_data(0).train_y.tolist()))


def _one_class_data(slot):
    g = torch.Generator().manual_seed(slot)
    return DeviceTensors(train_x=torch.randn(8, 3, 16, 16, generator=g), train_y=torch.zeros(8, dtype=torch.long),
                         test_x=torch.randn(6, 3, 16, 16, generator=g), test_y=torch.zeros(6, dtype=torch.long))


def _biased_message(kind, label_mask):
    """Classifier logits = its bias [1, 0, 0, 0, 0, 100, 0, ...]: unmasked every sample is class 5."""
    msg = _train_message(1.0, kind=kind)
    arrays = msg.content["arrays"]
    arrays["classifier.weight"] = Array(np.zeros((10, 4 * WIDTH), np.float32))
    arrays["classifier.bias"] = Array(np.array([1, 0, 0, 0, 0, 100, 0, 0, 0, 0], np.float32))
    msg.content["config"] = ConfigRecord({"round": 3, "rate": 1.0, "label_mask": label_mask})
    return msg


@pytest.mark.parametrize("kind, action", [(MessageType.TRAIN, "train"), (MessageType.EVALUATE, "evaluate")])
def test_client_scores_the_local_test_label_masked_when_asked(kind, action):
    device = dataclasses.replace(_device(), data=_one_class_data)  # trained on class 0 only
    masked = HeteroFLClient(device).handle(action, _biased_message(kind, True), None).content["metrics"]
    plain = HeteroFLClient(device).handle(action, _biased_message(kind, False), None).content["metrics"]
    assert masked["masked_accuracy"] == 1.0  # class 5 masked to 0 < class 0's logit 1
    assert plain["masked_accuracy"] == 0.0
    assert masked["accuracy"] == plain["accuracy"] == 0.0  # all classes scored: class 5 wins, comparable to other methods


def _statistics_message(static_bn):
    """A full model whose last BN carries mean 1e6: with those statistics every feature is 0 after the
    ReLU and the logits are the bias [1, 0, ...] (class 0); with any sBN on real data the features are
    positive and class 5's row (1000 on every feature) wins."""
    msg = _train_message(1.0, kind=MessageType.EVALUATE)
    arrays = msg.content["arrays"]
    arrays["features.4.1.running_mean"] = Array(np.full(4 * WIDTH, 1e6, np.float32))
    arrays["features.4.1.running_var"] = Array(np.ones(4 * WIDTH, np.float32))
    weight = np.zeros((10, 4 * WIDTH), np.float32)
    weight[5] = 1000.0
    arrays["classifier.weight"] = Array(weight)
    arrays["classifier.bias"] = Array(np.eye(10, dtype=np.float32)[0])
    msg.content["config"] = ConfigRecord({"round": 3, "rate": 1.0, "static_bn": static_bn})
    return msg


def test_client_scores_with_the_statistics_it_received_when_asked_not_to_recompute_them():
    device = dataclasses.replace(_device(), data=_one_class_data)  # every label is class 0
    received = HeteroFLClient(device).handle("evaluate", _statistics_message(False), None).content["metrics"]
    own = HeteroFLClient(device).handle("evaluate", _statistics_message(True), None).content["metrics"]
    assert received["accuracy"] == 1.0  # the cloud's statistics: features 0, class 0 by the bias
    assert own["accuracy"] == 0.0  # the device's own sBN: class 5


@pytest.mark.parametrize("config, problem", [({"static_bn": 0}, "'static_bn' must be a bool"),
                                             ({"statistics": True, "static_bn": False}, "with 'static_bn' false")])
def test_client_rejects_bad_evaluation_asks(config, problem):
    msg = _train_message(1.0, kind=MessageType.EVALUATE)
    msg.content["config"] = ConfigRecord({"round": 3, "rate": 1.0, **config})
    reply = HeteroFLClient(_device()).handle("evaluate", msg, None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and problem in reply.error.reason


def test_client_trains_label_masked_so_absent_classes_keep_their_rows():
    device = dataclasses.replace(_device(), data=_one_class_data)
    msg = _biased_message(MessageType.TRAIN, True)
    sent = msg.content["arrays"]["classifier.bias"].numpy().copy()
    got = HeteroFLClient(device).handle("train", msg, None).content["arrays"]["classifier.bias"].numpy()
    np.testing.assert_array_equal(got[1:], sent[1:])  # no gradient reaches the masked classes
    assert got[0] != sent[0]
    unmasked = HeteroFLClient(device).handle("train", _biased_message(MessageType.TRAIN, False), None)
    assert unmasked.content["arrays"]["classifier.bias"].numpy()[5] < sent[5]


def test_client_clips_the_gradient_norm_when_asked():
    one_sgd_step = TrainSettings(epochs=1, lr=1.0, batch_size=12, optimizer="sgd", momentum=0.0)
    device = dataclasses.replace(_device(), train=one_sgd_step)
    msg = _train_message(1.0)
    msg.content["config"] = ConfigRecord({"round": 3, "rate": 1.0, "clip_grad_norm": 0.05})
    sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    got = HeteroFLClient(device).handle("train", msg, None).content["arrays"]
    params = [k for k, _ in _net().named_parameters()]
    step = np.concatenate([(got[k].numpy() - sent[k]).ravel() for k in params])
    assert np.linalg.norm(step) == pytest.approx(0.05, rel=1e-3)  # lr 1 x the clipped gradient norm


@pytest.mark.parametrize("entry, value", [("label_mask", 1), ("clip_grad_norm", 0.0), ("clip_grad_norm", float("inf"))])
def test_client_rejects_bad_training_asks(entry, value):
    msg = _train_message(0.5)
    msg.content["config"] = ConfigRecord({"round": 3, "rate": 0.5, entry: value})
    reply = HeteroFLClient(_device()).handle("train", msg, None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and entry in reply.error.reason


def test_client_training_is_deterministic():
    a = HeteroFLClient(_device()).handle("train", _train_message(0.25), None).content["arrays"]
    b = HeteroFLClient(_device()).handle("train", _train_message(0.25), None).content["arrays"]
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_client_rejects_messages_without_rate_or_with_mismatched_arrays():
    no_rate = _train_message(0.5)
    no_rate.content["config"] = ConfigRecord({"round": 3})
    reply = HeteroFLClient(_device()).handle("train", no_rate, None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and "rate" in reply.error.reason
    mismatch = HeteroFLClient(_device()).handle("train", _train_message(0.5, arrays_rate=0.25), None)
    assert mismatch.has_error() and "do not fit the sub-model at rate 0.5" in mismatch.error.reason
    bad_rate = HeteroFLClient(_device()).handle("train", _train_message(1.0), None)
    assert bad_rate.has_content()
    bad_rate_msg = _train_message(1.0)
    bad_rate_msg.content["config"] = ConfigRecord({"round": 3, "rate": 2.0})
    assert "width rate" in HeteroFLClient(_device()).handle("train", bad_rate_msg, None).error.reason


def test_client_query_reports_every_rates_costs():
    msg = Message(RecordDict({"config": ConfigRecord({"round": 0})}), dst_node_id=1, message_type=MessageType.QUERY)
    budget = dict(HeteroFLClient(_device()).handle("query", msg, None).content["budget"])
    assert budget["flops_per_s"] == 1e9 and budget["width_cost/samples_per_round"] == 24.0
    memory = [budget[cost_key(r, "memory_bytes")] for r in WIDTH_RATES]
    assert memory == sorted(memory, reverse=True) and len(set(memory)) == len(memory)


def test_client_evaluates_a_submodel_with_static_bn():
    reply = HeteroFLClient(_device()).handle("evaluate", _train_message(0.25, kind=MessageType.EVALUATE), None)
    metrics = reply.content["metrics"]
    assert metrics["rate"] == 0.25 and metrics["num-examples"] == 6 and metrics["num_train_examples"] == 12
    assert "arrays" not in reply.content.array_records


def test_client_answers_an_sbn_query_with_its_bn_statistics():
    msg = _train_message(1.0, kind=MessageType.EVALUATE)
    msg.content["config"] = ConfigRecord({"round": 3, "rate": 1.0, "statistics": True})
    stats = HeteroFLClient(_device()).handle("evaluate", msg, None).content["arrays"]
    assert set(stats.keys()) == {f"features.{i}.1.running_{s}" for i in (0, 2, 4) for s in ("mean", "var")}
    assert stats["features.4.1.running_var"].numpy().shape == (4 * WIDTH,)
    model = _net()  # the first BN's mean is the mean of the first conv's output on the training data
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    with torch.no_grad():
        expected = model.features[0][0](_data(0).train_x).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(stats["features.0.1.running_mean"].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- a whole round, in process
class InProcessGrid:
    """Delivers each message to the handler of its node and returns the replies (no Ray)."""

    def __init__(self, handlers):
        self.handlers = handlers

    def get_node_ids(self):
        return sorted(self.handlers)

    def send_and_receive(self, messages, timeout=None):
        return [self.handlers[m.metadata.dst_node_id].handle(m.metadata.message_type, m, None) for m in messages]


def test_a_full_round_discovers_assigns_trains_and_merges():
    slow = {**BUDGET, "flops_per_s": 1e5}  # 0.1 MFLOP/s: 24 samples x 333k FLOPs at rate 1 take 80 s > 60 s
    tiny = {**BUDGET, "memory_bytes": 1.0}  # fits nothing
    handlers = {1000 + pid: HeteroFLClient(_device(pid, b)) for pid, b in enumerate([BUDGET, slow, tiny])}
    seen = []
    strategy = HeteroFL(
        per_round=3, seed=0, expected_devices=3, round_budget_s=60.0, on_round=seen.append,
    )
    grid = InProcessGrid(handlers)
    strategy.discover(grid, timeout_s=5.0)
    torch.manual_seed(0)
    start = ArrayRecord(_net().state_dict())

    def evaluate_fn(server_round, arrays):
        seen.append({k: tuple(v.shape) for k, v in arrays.items()})
        return MetricRecord({"accuracy": 0.1})

    out = strategy.run_round(grid, 1, start, evaluate_fn=evaluate_fn)
    assert strategy.assigned == {0: 1.0, 1: 0.5}  # rate 0.5: 24 x 111k FLOPs = 27 s
    shapes, record = seen
    assert shapes == {k: tuple(v.shape) for k, v in start.items()}  # the cloud evaluates the full model
    assert record["clients"] == [0, 1] and record["global_accuracy"] == 0.1
    assert [f["partition_id"] for f in record["failures"]] == [2]
    assert record["downlink_bytes"] > 0 and record["uplink_bytes"] > 0 and math.isfinite(record["accuracy"])
    changed = [k for k in start.keys() if not np.array_equal(start[k].numpy(), out[k].numpy())]
    assert "classifier.weight" in changed


def _own_data(pid):
    """Device ``pid``'s data: :func:`_data` of its own seed, so devices' statistics differ."""
    return lambda slot: _data(slot + 100 * pid)


@pytest.mark.parametrize("cloud", [False, True], ids=["device_query", "cloud_statistics"])
def test_a_full_round_with_global_sbn_scores_the_full_model_with_the_global_statistics(cloud):
    handlers = {1000 + pid: HeteroFLClient(dataclasses.replace(_device(pid), data=_own_data(pid))) for pid in range(2)}
    proxy_x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    measure = functools.partial(static_bn_statistics, _net, x=proxy_x, batch_size=4) if cloud else None
    records, seen = [], []
    strategy = HeteroFL(per_round=2, seed=0, expected_devices=2, round_budget_s=60.0, global_sbn=True,
                        cloud_statistics=measure, on_round=records.append)
    grid = InProcessGrid(handlers)
    strategy.discover(grid)
    torch.manual_seed(0)

    def evaluate_fn(server_round, arrays):
        seen.append({k: v.numpy().copy() for k, v in arrays.items() if "running" in k})
        return MetricRecord({"accuracy": 0.1})

    out = strategy.run_round(grid, 1, ArrayRecord(_net().state_dict()), evaluate_fn=evaluate_fn)
    [record] = records
    assert record["clients"] == [0, 1] and record["failures"] == []
    model = _net()
    model.load_state_dict(out.to_torch_state_dict())
    if cloud:  # the cloud's sBN of the aggregated model on its own inputs
        expected = static_bn_statistics(_net, {k: v.numpy() for k, v in out.items()}, proxy_x, 4)
        np.testing.assert_allclose(out["features.4.1.running_var"].numpy(), expected["features.4.1.running_var"])
    scores = [accuracy(model, _data(100 * pid).test_x, _data(100 * pid).test_y) for pid in range(2)]
    assert record["accuracy"] == pytest.approx(np.mean(scores))  # each device scored the model as it left the cloud
    assert all(np.array_equal(seen[0][k], out[k].numpy()) for k in seen[0])  # the global test saw those statistics
    assert 0 <= record["train_submodel_accuracy"] <= 1
    assert 0 <= record["masked_accuracy"] <= 1 and 0 <= record["train_masked_accuracy"] <= 1
