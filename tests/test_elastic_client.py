"""ElasticDNN on Flower messages (no Ray): one domain per round, state across rounds, the cloud's tallies."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.base import MALFORMED_MESSAGE, Device, StreamTensors
from clients.elastic import BATCHES_PER_ROUND, ElasticClient
from clients.online import OnlineClient
from experiments.config import from_dict
from experiments.schema import ConfigError
from experiments.validation import validate
from models.catalog import build_model
from models.elastic.remodel import pruned_model
from models.training import TrainSettings
from strategies.base import DeviceInfo
from strategies.elastic import ElasticDNN

torch.set_num_threads(1)
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e7}
BATCH = 12
DOMAINS = ("fog", "snow")


def _stream(index, domains=DOMAINS, per_domain=2):
    rng = np.random.default_rng([5, index])
    pixels = rng.integers(0, 256, size=(BATCH, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = torch.from_numpy(rng.integers(0, 5, size=BATCH))
    return StreamTensors(x=x, y=y, pixels=pixels, domain=domains[index // per_domain % len(domains)], index=index)


def _model():
    return build_model("elastic_fbs_resnet_cpu", num_classes=5, width=4, seed=0)


def _device(method="elasticdnn", stream=_stream, **options):
    return Device(
        partition_id=3, seed=0, budget=BUDGET, data=None, num_examples=lambda slot: 0,
        build_model=_model, train=TrainSettings(epochs=1, lr=1e-3, batch_size=8), flops_per_sample=1e6,
        load_factor=lambda r: 1.0, is_available=lambda r: True, slot_of_round=lambda r: 0,
        options={"method": method, "epochs": 2, "batch_size": 6, **options}, stream=stream,
    )


def _message(server_round, arrays=None):
    content = RecordDict({"config": ConfigRecord({"round": server_round})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _conv_weights(module):
    return {k: v.clone() for k, v in module.state_dict().items() if k.endswith("conv.weight")}


def test_each_round_adapts_on_one_batch_and_evaluates_on_the_next_of_the_same_domain():
    client, context = ElasticClient(_device()), _context()
    master = _model()
    reply = client.handle("train", _message(1, ArrayRecord(master.state_dict())), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert reply.content["stream"]["index"] == 1 and reply.content["stream"]["domain"] == "fog"  # held-out batch
    assert metrics["num-examples"] == BATCH and metrics["accuracy"] == metrics["correct"] / BATCH
    assert 0 < metrics["model_fraction"] < 0.3 and 0 < metrics["trained_fraction"] <= 1
    assert metrics["adapt_wall_s"] > 0 and metrics["adapt_flops"] > 0
    # the memory the method kept: master + bank + surrogate + momentum, then the training step's peak
    parts = ("master", "bank", "model", "optimizer")
    assert metrics["resident_memory_bytes"] == sum(metrics[f"memory_{p}_bytes"] for p in parts)
    assert metrics["memory_master_bytes"] > metrics["memory_model_bytes"] > 0 and metrics["memory_bank_bytes"] > 0
    assert metrics["peak_memory_bytes"] == (metrics["resident_memory_bytes"] + metrics["memory_gradients_bytes"]
                                            + metrics["memory_activations_bytes"])
    # virtual time: the counted FLOPs on the device's 1e9 FLOP/s at load 1
    assert metrics["compute_time_s"] == pytest.approx(metrics["adapt_flops"] / 1e9)
    assert OnlineClient.stream_index(context) == BATCHES_PER_ROUND


def test_the_master_learns_across_domains_and_the_next_round_needs_no_arrays():
    client, context = ElasticClient(_device()), _context()
    master = _model()
    before = _conv_weights(master)
    client.handle("train", _message(1, ArrayRecord(master.state_dict())), context)
    after_one = _conv_weights(OnlineClient.load_blob(context)["elastic"])
    assert any(not torch.equal(before[k], after_one[k]) for k in before)  # eq. 3-4 wrote back
    reply = client.handle("train", _message(2), context)
    assert not reply.has_error() and reply.content["stream"]["domain"] == "snow"
    assert OnlineClient.stream_index(context) == 2 * BATCHES_PER_ROUND


def test_source_baseline_keeps_its_pruned_model_and_the_master_unchanged():
    client, context = ElasticClient(_device("source")), _context()
    master = _model()
    reply = client.handle("train", _message(1, ArrayRecord(master.state_dict())), context)
    metrics = reply.content["metrics"]
    assert metrics["accuracy"] == metrics["accuracy_before"] and metrics["trained_fraction"] == 0
    saved = OnlineClient.load_blob(context)
    assert all(torch.equal(v, master.state_dict()[k]) for k, v in saved["elastic"].state_dict().items())
    assert saved["small"] is not None and 0 < metrics["model_fraction"] < 0.3


def test_first_message_without_the_master_and_mixed_domain_batches_are_refused():
    client, context = ElasticClient(_device()), _context()
    reply = client.handle("train", _message(1), context)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and "master" in reply.error.reason
    odd = ElasticClient(_device(stream=lambda i: _stream(i, per_domain=1)))
    reply = odd.handle("train", _message(1, ArrayRecord(_model().state_dict())), _context())
    assert reply.has_error() and "batches_per_domain" in reply.error.reason


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="elasticdnn"):
        ElasticClient(_device("magic"))


def test_validation_needs_an_even_stream_of_domains_for_elasticdnn():
    good = {"algorithm": {"name": "elasticdnn"}, "scenario": {"name": "evolving", "batches_per_domain": 2}}
    validate(from_dict(good, resolve_model=True))
    with pytest.raises(ConfigError, match="batches_per_domain"):
        validate(from_dict({**good, "scenario": {"name": "evolving", "batches_per_domain": 3}}, resolve_model=True))
    assert from_dict({"algorithm": {"name": "elasticdnn"}}).scenario.name == "evolving"  # its own, by default
    with pytest.raises(ConfigError, match="scenario=evolving"):
        validate(from_dict({"algorithm": {"name": "elasticdnn"}, "scenario": {"name": "one_step"}}, resolve_model=True))
    with pytest.raises(ConfigError, match="keep_fraction"):
        validate(from_dict({**good, "algorithm": {"name": "elasticdnn", "elasticdnn": {"keep_fraction": 0}}},
                           resolve_model=True))


# --------------------------------------------------------------------------- the compressed baseline
def _compressed_state(master, scale=0.5):
    """The master's 20 % largest-L1 filters with every float tensor scaled (so it differs from pruning)."""
    small = pruned_model(master, 0.2)
    return {k: v * scale if v.is_floating_point() else v for k, v in small.state_dict().items()}


def test_a_baseline_adapts_the_compressed_model_the_cloud_sent_not_a_fresh_pruning():
    client, context, master = ElasticClient(_device("source")), _context(), _model()
    sent = _compressed_state(master)
    msg = _message(1, ArrayRecord(master.state_dict()))
    msg.content["compressed"] = ArrayRecord(sent)
    reply = client.handle("train", msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    small = OnlineClient.load_blob(context)["small"].state_dict()
    assert set(small) == set(sent) and all(torch.equal(small[k], sent[k]) for k in sent)


def test_a_compressed_model_of_the_wrong_shape_is_refused_by_name():
    client, master = ElasticClient(_device("tent")), _model()
    wrong = {k: v[:1] if v.ndim else v for k, v in _compressed_state(master).items()}
    msg = _message(1, ArrayRecord(master.state_dict()))
    msg.content["compressed"] = ArrayRecord(wrong)
    reply = client.handle("train", msg, _context())
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and "compressed" in reply.error.reason


def test_the_cloud_ships_the_compressed_model_once_beside_the_master():
    compressed, arrays = ArrayRecord(_compressed_state(_model())), ArrayRecord(_model().state_dict())
    strategy = ElasticDNN(compressed=compressed, per_round=2, seed=0, expected_devices=2)
    for pid in (0, 1):
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 0, dict(BUDGET))
        strategy._by_node[100 + pid] = pid
    first = strategy.configure_train(1, arrays, ConfigRecord(), None)
    assert all(set(m.content.array_records) == {"arrays", "compressed"} for m in first)
    strategy.served.add(0)
    second = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord(), None)}
    assert set(second[100].content.array_records) == set()
    assert set(second[101].content.array_records) == {"arrays", "compressed"}
    plain = ElasticDNN(per_round=1, seed=0, expected_devices=1)
    assert set(plain.first_arrays(arrays)) == {"arrays"}


def test_adapt_to_domain_needs_the_same_size_model_for_a_baseline():
    from models.elastic.remodel import RemodelSettings, adapt_to_domain

    with pytest.raises(ValueError, match="small"):
        adapt_to_domain("tent", _model(), None, _stream(0).x, RemodelSettings())


def test_validation_lets_only_elasticdnn_average_banks():
    good = {"algorithm": {"name": "elasticdnn", "elasticdnn": {"bank_fedavg": True}},
            "scenario": {"name": "evolving", "batches_per_domain": 2}}
    validate(from_dict(good, resolve_model=True))
    bad = {**good, "algorithm": {"name": "elasticdnn", "elasticdnn": {"bank_fedavg": True, "method": "tent"}}}
    with pytest.raises(ConfigError, match="bank_fedavg"):
        validate(from_dict(bad, resolve_model=True))
    with pytest.raises(ConfigError, match="compress_epochs"):
        validate(from_dict({**good, "algorithm": {"name": "elasticdnn", "elasticdnn": {"compress_epochs": -1}}},
                           resolve_model=True))


def test_without_master_update_the_master_stays_the_pretrained_one():
    client, context = ElasticClient(_device(master_update=False)), _context()
    master = _model()
    reply = client.handle("train", _message(1, ArrayRecord(master.state_dict())), context)
    assert not reply.has_error() and reply.content["metrics"]["updated_layers"] == 0
    saved = OnlineClient.load_blob(context)["elastic"].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in master.state_dict().items())
    with pytest.raises(ConfigError, match="master_update"):
        validate(from_dict({"algorithm": {"name": "elasticdnn", "elasticdnn": {"bank_fedavg": True,
                                                                              "master_update": False}},
                            "scenario": {"name": "evolving"}}, resolve_model=True))


def _bn_affine(module):
    return {k: v.clone() for k, v in module.state_dict().items() if ".bn." in k and k.endswith(("weight", "bias"))}


@pytest.mark.parametrize("write_back_bn", [False, True])
def test_the_master_takes_the_surrogates_bn_affine_only_when_asked(write_back_bn):
    client, context = ElasticClient(_device(write_back_bn=write_back_bn)), _context()
    master = _model()
    before = _bn_affine(master)
    assert before  # the gated units carry BN
    reply = client.handle("train", _message(1, ArrayRecord(master.state_dict())), context)
    assert not reply.has_error() and reply.content["metrics"]["updated_layers"] > 0  # the conv filters went back
    after = _bn_affine(OnlineClient.load_blob(context)["elastic"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert bool(changed) is write_back_bn
    with pytest.raises(ConfigError, match="write_back_bn"):
        validate(from_dict({"algorithm": {"name": "elasticdnn", "elasticdnn": {"write_back_bn": True,
                                                                              "master_update": False}},
                            "scenario": {"name": "evolving"}}, resolve_model=True))
