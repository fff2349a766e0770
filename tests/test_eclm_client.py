"""ECLM's edge (seed 001 sections 3, 5.1): importance profiling, sub-model training, local adjustment.

Hand-built Messages on a hand-built Device (as tests/test_clients.py); the network is a
modular ResNet18 at width 4 on 16x16 inputs with 4 modules per layer (m3 is the residual
bypass of every layer).
"""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from clients.base import MALFORMED_MESSAGE, Device, DeviceTensors
from clients.eclm import PROFILE_BATCH, ECLMClient, catalog_of
from models.catalog import build_model
from models.eclm.families import build_modular
from models.eclm.layer import module_of_key
from models.training import TrainSettings
from strategies.eclm import submodel_arrays

torch.set_num_threads(1)

RESNET = dict(num_classes=4, width=4, in_channels=3, modules_per_layer=4, image_size=16)
BUDGET = {"flops_per_s": 1e12, "memory_bytes": 1e12, "uplink_bps": 1e6, "downlink_bps": 1e7, "device_class": "x"}
TRAIN = TrainSettings(epochs=1, lr=1e-2, batch_size=8)
TRAIN_SAMPLES = 20
#: More samples than one profiling batch, so importance must add up over batches.
PROFILE_SAMPLES = PROFILE_BATCH + 44
#: A sub-model over all 4 layers: two shrunk modules, shrunk + residual, one shrunk, shrunk + residual.
IDS = ("l0.m0", "l0.m2", "l1.m1", "l1.m3", "l2.m0", "l3.m2", "l3.m3")


def _data(slot, train_samples=TRAIN_SAMPLES):
    g = torch.Generator().manual_seed(slot)
    return DeviceTensors(
        train_x=torch.randn(train_samples, 3, 16, 16, generator=g),
        train_y=torch.randint(0, 4, (train_samples,), generator=g),
        test_x=torch.randn(8, 3, 16, 16, generator=g),
        test_y=torch.randint(0, 4, (8,), generator=g),
    )


def _device(load=1.0, options=None, train_samples=TRAIN_SAMPLES, build=None):
    return Device(
        partition_id=3,
        seed=0,
        budget=BUDGET,
        data=lambda slot: _data(slot, train_samples),
        num_examples=lambda slot: train_samples,
        build_model=build or (lambda: build_modular("modular_resnet18", **RESNET)),
        train=TRAIN,
        flops_per_sample=1e6,
        load_factor=lambda r: load,
        is_available=lambda r: True,
        slot_of_round=lambda r: 0,
        options={"round_budget_s": 1e9, "local_adjust": True, **(options or {})},
    )


def _cloud(seed=0):
    return build_modular("modular_resnet18", seed=seed, **RESNET)


def _train_message(ids=IDS, arrays_ids=None, server_round=2, modules=True, arrays=True):
    cloud = _cloud()
    content = RecordDict()
    if arrays:
        content["arrays"] = submodel_arrays(ArrayRecord(cloud.state_dict()), arrays_ids or ids, cloud.layer_sizes())
    config = {"round": server_round}
    if modules:
        config["modules"] = ",".join(ids)
    content["config"] = ConfigRecord(config)
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _query_message(selector=None, server_round=2):
    content = RecordDict({"config": ConfigRecord({"round": server_round})})
    if selector is not None:
        content["selector"] = selector
    return Message(content, dst_node_id=1, message_type=MessageType.QUERY)


def _selector_of(model):
    return ArrayRecord({k: v for k, v in model.state_dict().items() if k.startswith("selector.")})


# --------------------------------------------------------------------------- profiling (5.1)
def test_profiling_query_returns_mean_softmax_gates_of_the_sent_selector():
    cloud = _cloud(seed=5)  # differs from the device's own seed-0 network: the sent selector must be used
    device = _device(train_samples=PROFILE_SAMPLES)
    reply = ECLMClient(device).handle("query", _query_message(_selector_of(cloud)), None)
    assert reply.has_content(), reply.error.reason if reply.has_error() else ""
    importance = dict(reply.content["importance"])
    assert set(importance) == {f"l{l}.m{i}" for l in range(4) for i in range(4)}
    # by hand: every module is active, so g(x) is the plain softmax of the clean logits (ECLM 5.1)
    cloud.eval()
    with torch.no_grad():
        logits = cloud.selector(_data(0, PROFILE_SAMPLES).train_x)
    for layer, lg in enumerate(logits):
        expected = torch.softmax(lg, dim=1).mean(dim=0)
        got = [importance[f"l{layer}.m{i}"] for i in range(4)]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-7)
        assert all(0.0 <= v <= 1.0 for v in got)
        assert sum(got) == pytest.approx(1.0, abs=1e-5)
    own = torch.softmax(_cloud(seed=0).eval().selector(_data(0, PROFILE_SAMPLES).train_x)[0], dim=1).mean(0)
    assert not np.allclose([importance[f"l0.m{i}"] for i in range(4)], own.detach().numpy(), rtol=1e-3)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == PROFILE_SAMPLES and metrics["partition_id"] == 3


def test_importance_of_a_sub_model_is_the_full_selector_softmax_the_cloud_profiled():
    # ECLM 5.1's g(x) is the selector's distribution over all N modules: a sub-model's held modules
    # get exactly the values the full model (the cloud's profiling) gives them
    cloud = _cloud()
    sub = cloud.extract(IDS)
    x = _data(0).train_x
    importance, full = ECLMClient.importance(sub, x), ECLMClient.importance(cloud, x)
    assert importance == full
    with torch.no_grad():
        logits = cloud.selector(x)[1]
    expected = torch.softmax(logits, dim=1).mean(0)  # over all 4 modules of layer 1
    np.testing.assert_allclose([importance[f"l1.m{i}"] for i in range(4)], expected.numpy(), rtol=1e-5)
    assert importance["l2.m0"] < 1.0  # the only held module of layer 2 still has its own share


def test_discovery_query_without_selector_reports_the_budget():
    reply = ECLMClient(_device()).handle("query", _query_message(), None)
    assert dict(reply.content["budget"]) == BUDGET
    assert reply.content["metrics"]["partition_id"] == 3
    assert "importance" not in reply.content.metric_records


def test_selector_of_another_architecture_gets_an_error_reply():
    other = build_modular("modular_resnet18", **{**RESNET, "modules_per_layer": 5})
    reply = ECLMClient(_device()).handle("query", _query_message(_selector_of(other)), None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE
    assert "selector does not fit" in reply.error.reason


# --------------------------------------------------------------------------- training
def _module_keys(arrays):
    return {k for k in arrays.keys() if module_of_key(k) is not None}


def test_train_replies_exactly_the_sent_sub_model_and_its_metrics():
    msg = _train_message()
    reply = ECLMClient(_device(load=2.0)).handle("train", msg, None)
    assert reply.has_content(), reply.error.reason if reply.has_error() else ""
    sent, got = msg.content["arrays"], reply.content["arrays"]
    assert set(got.keys()) == {k for k in sent.keys() if not k.endswith(".active")}
    assert not any(k.endswith(".active") for k in got.keys())
    assert {module_of_key(k) for k in _module_keys(got)} == {"l0.m0", "l0.m2", "l1.m1", "l2.m0", "l3.m2"}
    assert any(not np.array_equal(sent[k].numpy(), got[k].numpy()) for k in got.keys())  # it trained
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == TRAIN_SAMPLES and metrics["partition_id"] == 3
    assert metrics["accuracy"] * 8 == round(metrics["accuracy"] * 8)  # k of 8 test samples
    assert metrics["modules"] == len(IDS) and metrics["modules_dropped"] == 0
    assert metrics["load_factor"] == 2.0
    costs, shared, _ = catalog_of(_cloud(), TRAIN.batch_size)
    c = {mid: costs[mid][1] for mid in costs}
    # top-2 routing: layer 0 runs both held modules, layer 1 min(2, 2) x mean(m1, m3 = 0) = m1,
    # layer 2 its one module, layer 3 min(2, 2) x mean(m2, m3 = 0) = m2
    flops = shared[1] + 2 * c["l0.m0"] + c["l1.m1"] + c["l2.m0"] + c["l3.m2"]
    # 20 samples x 1 epoch x flops / 1e12 FLOP/s x load 2
    assert metrics["compute_time_s"] == pytest.approx(20 * flops / 1e12 * 2.0, rel=1e-9)
    memory = shared[2] + sum(costs[m][2] for m in IDS)
    assert metrics["train_memory_bytes"] == pytest.approx(memory)


def _tight_options(load):
    """round_budget_s under which only shared parts + forced modules fit the compute budget."""
    cloud = _cloud()
    costs, shared, _ = catalog_of(cloud, TRAIN.batch_size)
    sub = cloud.extract(IDS)
    with torch.no_grad():
        logits = sub.selector(_data(0).train_x)
    forced = []
    for layer, lg in enumerate(logits):
        held = [int(m[4:]) for m in IDS if m.startswith(f"l{layer}.")]
        scores = torch.softmax(lg, dim=1).mean(0)[held]  # the full selector softmax, as the cloud profiles it
        forced.append(f"l{layer}.m{held[int(scores.argmax())]}")
    cheapest = min(c[1] for c in costs.values() if c[1] > 0)
    comp = shared[1] + sum(costs[m][1] for m in forced) + cheapest / 2
    # comp = seconds x flops_per_s / load / (samples x epochs), solved for seconds
    seconds = comp * load * TRAIN_SAMPLES * TRAIN.epochs / BUDGET["flops_per_s"]
    return {"round_budget_s": seconds}, tuple(forced)


def test_local_adjust_drops_the_least_important_modules_under_load():
    load = 1e4
    options, forced = _tight_options(load)
    assert options["round_budget_s"] < 1.0  # a tiny round budget on a heavily loaded device
    reply = ECLMClient(_device(load=load, options=options)).handle("train", _train_message(), None)
    assert reply.has_content(), reply.error.reason if reply.has_error() else ""
    # kept: the forced (most important) module of every layer, and the residual bypasses (they cost
    # no compute, so dropping them cannot help); every other shrunk module goes
    kept = set(forced) | {"l1.m3", "l3.m3"}
    metrics = reply.content["metrics"]
    assert metrics["modules"] == len(kept) and metrics["modules_dropped"] == len(IDS) - len(kept) > 0
    got = reply.content["arrays"]
    assert {module_of_key(k) for k in _module_keys(got)} == set(forced) - {"l1.m3", "l3.m3"}
    expected = {k for k in _cloud().extract(sorted(kept)).state_dict() if not k.endswith(".active")}
    assert set(got.keys()) == expected
    # the same load without local adjustment trains everything it was sent
    off = ECLMClient(_device(load=load, options={**options, "local_adjust": False}))
    assert off.handle("train", _train_message(), None).content["metrics"]["modules_dropped"] == 0


def test_local_adjust_keeps_the_sent_set_when_even_the_forced_set_is_over():
    options = {"round_budget_s": 1e-12}
    reply = ECLMClient(_device(load=1e4, options=options)).handle("train", _train_message(), None)
    assert reply.content["metrics"]["modules_dropped"] == 0


@pytest.mark.parametrize(
    "message, reason",
    [
        (lambda: _train_message(modules=False), "config 'modules'"),
        (lambda: _train_message(arrays=False), "no array record"),
        (lambda: _train_message(arrays_ids=("l0.m1", "l1.m0", "l2.m0", "l3.m0")), "do not fit"),
        (lambda: _train_message(ids=("l9.m0",), arrays_ids=IDS), "l9.m0"),
        (lambda: _train_message(ids=("l0.m0", "nonsense"), arrays_ids=IDS), "nonsense"),
    ],
)
def test_malformed_train_messages_get_error_replies(message, reason):
    reply = ECLMClient(_device()).handle("train", message(), None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE
    assert reason in reply.error.reason


def test_a_non_modular_network_gets_an_error_reply():
    device = _device(build=lambda: build_model("cnn", num_classes=4, width=4))
    reply = ECLMClient(device).handle("train", _train_message(), None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE
    assert "ECLM needs a modular network" in reply.error.reason and "config 'modules'" not in reply.error.reason


def test_arrays_with_a_wrong_shape_get_an_error_reply():
    msg = _train_message()
    msg.content["arrays"]["head.2.bias"] = Array(np.zeros(5, dtype=np.float32))
    reply = ECLMClient(_device()).handle("train", msg, None)
    assert reply.has_error() and "do not fit" in reply.error.reason


# --------------------------------------------------------------------------- determinism
def test_same_train_message_twice_gives_identical_arrays():
    first = ECLMClient(_device()).handle("train", _train_message(), None).content["arrays"]
    again = ECLMClient(_device()).handle("train", _train_message(), None).content["arrays"]
    assert all(first[k].numpy().tobytes() == again[k].numpy().tobytes() for k in first.keys())
    other_round = ECLMClient(_device()).handle("train", _train_message(server_round=3), None).content["arrays"]
    assert any(first[k].numpy().tobytes() != other_round[k].numpy().tobytes() for k in first.keys())
