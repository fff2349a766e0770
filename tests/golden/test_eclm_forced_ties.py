"""The cloud and a device force the same module of a layer when importances tie (ECLM 5.1).

The cloud forces the most important module of every layer when it derives a sub-model; a
device adjusting that sub-model to its load must never drop it, so it has to pick the very
same module. Here modules l0.m2 and l0.m10 of a 12-module MLP tie exactly for the highest
gate (the selector head gives every sample the same logits). As plain strings "l0.m10" sorts
before "l0.m2"; in the shared natural order (``models.eclm.knapsack.module_order``) l0.m2 comes
first, so both sides must force l0.m2.
"""

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from clients.base import Device, DeviceTensors
from clients.eclm import ECLMClient, catalog_of
from experiments.algorithms.eclm import catalog
from models.eclm.families import build_modular
from models.eclm.layer import module_of_key
from models.training import TrainSettings
from strategies.base import DeviceInfo
from strategies.eclm import ECLM, submodel_arrays

torch.set_num_threads(1)

MLP = dict(num_classes=4, width=8, in_channels=1, modules_per_layer=12, image_size=4)
TRAIN = TrainSettings(epochs=1, lr=1e-2, batch_size=8)
SAMPLES = 16
FLOPS_PER_S = 1e12
#: The tied modules; m11 is the layer's free residual bypass.
TIED = ("l0.m2", "l0.m10")
SENT = ("l0.m2", "l0.m5", "l0.m10", "l0.m11")


def _tied_net():
    net = build_modular("modular_mlp", **MLP)
    with torch.no_grad():
        head = net.selector.heads[0]
        head.weight.zero_()
        head.bias.zero_()
        head.bias[[2, 10]] = 3.0  # logits do not depend on the sample: m2 and m10 tie exactly on top
    return net


def _data(slot):
    g = torch.Generator().manual_seed(slot)
    x = torch.randn(SAMPLES, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (SAMPLES,), generator=g)
    return DeviceTensors(train_x=x, train_y=y, test_x=x[:4], test_y=y[:4])


def _device(round_budget_s):
    return Device(
        partition_id=0, seed=0,
        budget={"flops_per_s": FLOPS_PER_S, "memory_bytes": 1e12, "uplink_bps": 1e9, "downlink_bps": 1e9},
        data=_data, num_examples=lambda slot: SAMPLES, build_model=lambda: build_modular("modular_mlp", **MLP),
        train=TRAIN, flops_per_sample=1e6, load_factor=lambda r: 1.0, is_available=lambda r: True,
        slot_of_round=lambda r: 0, options={"round_budget_s": round_budget_s, "local_adjust": True},
    )


def _only_forced_fits(net, dimension):
    """Budget in ``dimension`` (1 = FLOPs, 2 = memory) for the shared parts, one shrunk module and half another."""
    costs, shared, _ = catalog_of(net, TRAIN.batch_size)
    module = costs["l0.m0"][dimension]  # every shrunk module of the layer costs the same
    return shared[dimension] + 1.5 * module


def test_importances_tie_exactly():
    importance = ECLMClient.importance(_tied_net(), _data(0).train_x)
    assert importance["l0.m2"] == importance["l0.m10"] == max(importance.values())


def test_the_cloud_forces_the_first_tied_module_in_natural_order():
    net = _tied_net()
    strategy = ECLM(
        catalog=catalog(net, TRAIN.batch_size), layer_sizes=net.layer_sizes(), samples_per_device=SAMPLES,
        epochs=1, round_budget_s=10.0, size_cap=1.0, per_round=1, seed=0, expected_devices=1,
    )
    memory = _only_forced_fits(net, 2)
    strategy.devices[0] = DeviceInfo(0, 100, SAMPLES, {**_device(1.0).budget, "memory_bytes": memory})
    strategy.importance[0] = ECLMClient.importance(net, _data(0).train_x)  # what the profiling query returns
    ids = strategy.derive(0)
    assert "l0.m2" in ids and "l0.m10" not in ids
    assert set(ids) == {"l0.m2", "l0.m11"}  # plus the free residual bypass


def test_a_device_under_load_keeps_the_same_forced_module():
    net = _tied_net()
    comp = _only_forced_fits(net, 1)
    seconds = comp * SAMPLES * TRAIN.epochs / FLOPS_PER_S  # comp = seconds * flops_per_s / (samples * epochs)
    content = RecordDict({
        "arrays": submodel_arrays(ArrayRecord(net.state_dict()), SENT, net.layer_sizes()),
        "config": ConfigRecord({"round": 1, "modules": ",".join(SENT)}),
    })
    message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    reply = ECLMClient(_device(seconds)).handle("train", message, None)
    assert reply.has_content(), reply.error.reason if reply.has_error() else ""
    kept = {module_of_key(k) for k in reply.content["arrays"].keys()} - {None}
    assert kept == {"l0.m2"}  # the residual l0.m11 is kept too but has no parameters
    assert reply.content["metrics"]["modules"] == 2 and reply.content["metrics"]["modules_dropped"] == 2
    assert np.isfinite(reply.content["metrics"]["train_loss"])
