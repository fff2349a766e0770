"""CEMA on Flower messages, without Ray: the edge handler over rounds and the cloud strategy."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients.base import MALFORMED_MESSAGE, Device, StreamTensors
from clients.cema import FORWARD_FLOP_FRACTION, UPLOAD_LABELS, CEMAClient
from clients.online import OnlineClient
from models.catalog import build_model
from models.cema.filter import UploadFilter
from models.losses import prediction_entropy
from models.training import TrainSettings
from strategies.base import DeviceInfo
from strategies.cema import CEMA, SHARED, bn_state_keys
from strategies.metrics import metric_values
from strategies.payload import payload_bytes
from strategies.protocol import ORACLE_RECORD

torch.set_num_threads(1)
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e7}
# No redundancy test (softmaxes are non-negative, so |cos| <= 1 < 1.5), a wide entropy window and
# no warm-up (official default), so the upload set is exactly E_min < E < E_max^0.
FILTER = {"cosine_margin": 1.5, "e_max_fraction": 0.35, "e_min_fraction": 0.02}
OPTIONS = {**FILTER, "edge_bn": "running"}  # eval-mode edge, so the test can recompute its logits
BATCH = 16


def _edge():
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, width=4)
    with torch.no_grad():
        model.classifier.weight.mul_(200.0)  # spread the entropies over (0, ln 10)
    return model


def _foundation():
    torch.manual_seed(1)
    return build_model("cnn", num_classes=10, width=8)


def _preprocess(pixels):
    return torch.from_numpy(pixels.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)


def _pixels(seed, n):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _stream(index):
    pixels = _pixels(index, BATCH)
    y = torch.from_numpy(np.random.default_rng([index, 1]).integers(0, 10, size=BATCH))
    return StreamTensors(x=_preprocess(pixels), y=y, pixels=pixels, domain="fog", index=index)


def _device():
    return Device(
        partition_id=3, seed=0, budget=BUDGET, data=None, num_examples=lambda slot: 0,
        build_model=lambda: build_model("cnn", num_classes=10, width=4),
        train=TrainSettings(epochs=1, lr=1e-3, batch_size=8), flops_per_sample=3e6,
        load_factor=lambda r: 2.0, is_available=lambda r: True, slot_of_round=lambda r: 0,
        options=OPTIONS, stream=_stream,
    )


def _context():
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


def _train_message(server_round, arrays=None):
    content = RecordDict({"config": ConfigRecord({"round": server_round})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content, dst_node_id=5, message_type=MessageType.TRAIN)


def _bn_update(model, shift):
    return {k: v + shift if v.is_floating_point() else v + 1 for k, v in model.state_dict().items()
            if k in bn_state_keys(model)}


# --------------------------------------------------------------------------- the edge
def test_device_predicts_filters_and_keeps_its_model_over_three_rounds():
    client, context, edge = CEMAClient(_device()), _context(), _edge()
    reference, expected_state, uploaded_any, mixed = UploadFilter(10, **FILTER), edge.state_dict(), False, False
    messages = [_train_message(1, edge.state_dict()), _train_message(2, _bn_update(edge, 0.5)), _train_message(3)]
    for index, msg in enumerate(messages):
        reply = client.handle("train", msg, context)
        assert reply.has_content(), reply.error.reason if reply.has_error() else ""
        assert OnlineClient.stream_index(context) == index + 1
        if "arrays" in msg.content:
            expected_state = {**expected_state, **msg.content["arrays"].to_torch_state_dict()}
        model = build_model("cnn", num_classes=10, width=4)
        model.load_state_dict(expected_state)
        model.eval()
        with torch.no_grad():
            logits = model(_stream(index).x)
        mask = reference.select(logits)
        ents = prediction_entropy(logits.double(), log_space=True)
        metrics = reply.content["metrics"]
        assert metrics["uploads"] == int(mask.sum())
        assert metrics["correct"] == int((logits.argmax(1) == _stream(index).y).sum())
        assert metrics["partition_id"] == 3 and reply.content["stream"]["domain"] == "fog"
        # 16 samples x 3e6 FLOPs x 1/3 (forward only) / 1e9 FLOP/s x load 2
        assert metrics["compute_time_s"] == pytest.approx(BATCH * 3e6 * FORWARD_FLOP_FRACTION / 1e9 * 2.0)
        if mask.any():
            uploaded_any = True
            np.testing.assert_array_equal(reply.content["uploads"]["pixels"].numpy(), _stream(index).pixels[mask.numpy()])
            assert ((ents[mask] > reference.e_min) & (ents[mask] < reference.e_max0)).all()
        else:
            assert "uploads" not in reply.content
        assert not ((ents > reference.e_min) & (ents < reference.e_max0) & ~mask).any()
        mixed = mixed or 0 < int(mask.sum()) < BATCH
        saved = OnlineClient.load_blob(context)
        assert saved["filter"] == reference.state_dict()
    assert uploaded_any and mixed  # the window both kept and dropped samples


def test_bn_only_update_changes_exactly_the_bn_entries():
    client, context, edge = CEMAClient(_device()), _context(), _edge()
    client.handle("train", _train_message(1, edge.state_dict()), context)
    before = OnlineClient.load_blob(context)["model"]
    client.handle("train", _train_message(2, _bn_update(edge, 0.25)), context)
    after = OnlineClient.load_blob(context)["model"]
    bn = set(bn_state_keys(edge))
    assert bn == {f"features.{i}.1.{s}" for i in (0, 2, 4)
                  for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for key in before:
        assert torch.equal(before[key], after[key]) == (key not in bn), key
    torch.testing.assert_close(after["features.2.1.bias"], edge.state_dict()["features.2.1.bias"] + 0.25)


@pytest.mark.parametrize("arrays", [None, {"features.0.1.weight": torch.ones(4)}])
def test_first_message_must_carry_the_full_model(arrays):
    context = _context()
    reply = CEMAClient(_device()).handle("train", _train_message(1, arrays), context)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE
    assert "full edge model" in reply.error.reason
    assert OnlineClient.stream_index(context) == 0


def test_wrong_shapes_and_unknown_keys_are_malformed():
    client, context, edge = CEMAClient(_device()), _context(), _edge()
    client.handle("train", _train_message(1, edge.state_dict()), context)
    for bad in ({"features.0.1.weight": torch.ones(5)}, {"nope": torch.ones(1)}):
        reply = client.handle("train", _train_message(2, bad), context)
        assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE
    assert OnlineClient.stream_index(context) == 1


# --------------------------------------------------------------------------- the cloud
def _strategy(send="bn", devices=(0, 1, 2), seed=0, edge_models="shared"):
    strategy = CEMA(foundation=_foundation(), edge_factory=lambda: build_model("cnn", num_classes=10, width=4),
                    preprocess=_preprocess, num_classes=10, send=send, per_round=len(devices), seed=seed,
                    expected_devices=len(devices), edge_models=edge_models)
    for pid in devices:
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 0, dict(BUDGET))
        strategy._by_node[100 + pid] = pid
    return strategy


def _reply(strategy, pid, domain, correct, n=BATCH, pixels=None):
    msg = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=strategy.devices[pid].node_id,
                  message_type=MessageType.TRAIN)
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": n, "correct": correct, "accuracy": correct / n,
                                 "uploads": 0 if pixels is None else len(pixels)}),
        "stream": ConfigRecord({"domain": domain, "index": 0}),
    })
    if pixels is not None:
        content["uploads"] = ArrayRecord({"pixels": Array(pixels)})
    return Message(content, reply_to=msg)


def _by_pid(strategy, messages):
    return {strategy._by_node[m.metadata.dst_node_id]: m for m in messages}


@pytest.mark.parametrize("send", ["bn", "full"])
def test_full_model_on_first_participation_then_the_send_keys(send):
    strategy, edge = _strategy(send), _edge()
    arrays = ArrayRecord(edge.state_dict())
    first = _by_pid(strategy, strategy.configure_train(1, arrays, ConfigRecord(), None))
    assert all(set(m.content["arrays"].keys()) == set(arrays.keys()) for m in first.values())
    assert all(m.content["config"]["round"] == 1 for m in first.values())
    strategy.aggregate_train(1, [_reply(strategy, 0, "fog", 1), _reply(strategy, 1, "fog", 1)])  # 2 never answers
    second = _by_pid(strategy, strategy.configure_train(2, arrays, ConfigRecord(), None))
    expected = set(bn_state_keys(edge)) if send == "bn" else set(arrays.keys())
    assert set(second[0].content["arrays"].keys()) == expected == set(second[1].content["arrays"].keys())
    assert set(second[2].content["arrays"].keys()) == set(arrays.keys())


def _bn_affine_and_stats(model):
    return set(bn_state_keys(model))


def test_aggregate_adapts_and_distils_only_bn_entries_and_carries_the_remainder():
    strategy, edge = _strategy(), _edge()
    arrays = ArrayRecord(edge.state_dict())
    strategy.configure_train(1, arrays, ConfigRecord(), None)
    foundation_before = {k: v.clone() for k, v in strategy.foundation.state_dict().items()}
    replies = [_reply(strategy, 0, "fog", 3, pixels=_pixels(10, 40)), _reply(strategy, 1, "clean", 8, pixels=_pixels(11, 30))]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["cloud_steps"] == 2 and metrics["pending_uploads"] == 70 - 64
    header_bytes = sum(len(r.content["uploads"]["pixels"].data) for r in replies) - 70 * 32 * 32 * 3
    assert 0 <= header_bytes <= 2 * 256  # the pixels plus one .npy header per reply
    assert metrics["uploaded_samples"] == 70 and metrics["uploaded_bytes"] == 70 * 32 * 32 * 3 + header_bytes
    assert len(strategy.tracks[SHARED].buffer) == 70 and metrics["cloud_compute_s"] > 0  # each edge batch whole
    old, changed = arrays.to_torch_state_dict(), new.to_torch_state_dict()
    bn = _bn_affine_and_stats(edge)
    for key in old:
        assert torch.equal(old[key], changed[key]) == (key not in bn), key
    teacher_bn, after = _bn_affine_and_stats(strategy.foundation), strategy.foundation.state_dict()
    for key in after:  # the teacher adapts BN only (a tiny lr may leave single entries equal in float32)
        if key not in teacher_bn:
            assert torch.equal(after[key], foundation_before[key]), key
    affine = [k for k in teacher_bn if k.endswith(("weight", "bias"))]
    assert any(not torch.equal(after[k], foundation_before[k]) for k in affine)
    assert not torch.equal(after["features.0.1.running_mean"], foundation_before["features.0.1.running_mean"])
    new2, metrics2 = strategy.aggregate_train(2, [_reply(strategy, 0, "fog", 0, pixels=_pixels(12, 26))])
    assert metrics2["cloud_steps"] == 1 and metrics2["pending_uploads"] == 0
    assert len(strategy.tracks[SHARED].buffer) == 96
    assert metrics["replay_steps"] == metrics2["replay_steps"] == 0  # 96 held: no replay yet


def test_cumulative_online_accuracy_per_domain_by_hand():
    strategy = _strategy()
    strategy.configure_train(1, ArrayRecord(_edge().state_dict()), ConfigRecord(), None)
    strategy.aggregate_train(1, [_reply(strategy, 0, "fog", 3), _reply(strategy, 1, "clean", 8)])
    _, record = strategy.aggregate_train(2, [_reply(strategy, 0, "fog", 5)])
    metrics = metric_values(record)
    assert metrics["online_accuracy_by_domain"] == {"clean": 8 / 16, "fog": (3 + 5) / 32}
    assert metrics["online_accuracy"] == pytest.approx(16 / 48)
    assert metrics["uploaded_samples"] == 0 and metrics["cloud_steps"] == 0 and metrics["accuracy"] == 5 / 16


def test_same_seed_same_edge_model():
    results = []
    for _ in range(2):
        strategy = _strategy(seed=4)
        strategy.configure_train(1, ArrayRecord(_edge().state_dict()), ConfigRecord(), None)
        new, _ = strategy.aggregate_train(1, [_reply(strategy, 0, "fog", 3, pixels=_pixels(10, 64))])
        results.append(new.to_torch_state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_bad_uploads_are_rejected_and_recorded():
    strategy = _strategy()
    strategy.configure_train(1, ArrayRecord(_edge().state_dict()), ConfigRecord(), None)
    bad = np.zeros((4, 32, 32), dtype=np.uint8)
    _, metrics = strategy.aggregate_train(1, [_reply(strategy, 0, "fog", 3, pixels=bad)])
    assert metrics["uploaded_samples"] == 0
    assert strategy.ledger.failures[0]["partition_id"] == 0 and "uint8 (k, H, W, C)" in strategy.ledger.failures[0]["reason"]


@pytest.mark.parametrize("kwargs, match", [({"send": "all"}, "send='all'"), ({"num_classes": 1}, "num_classes=1"),
                                           ({"cloud_batch_size": 0}, "cloud_batch_size=0")])
def test_bad_settings_raise(kwargs, match):
    args = dict(foundation=_foundation(), edge_factory=_edge, preprocess=_preprocess, num_classes=10,
                per_round=1, seed=0, expected_devices=1)
    with pytest.raises(ValueError, match=match):
        CEMA(**{**args, **kwargs})



def test_per_device_edge_models_learn_only_from_their_own_uploads():
    strategy, edge = _strategy(edge_models="per_device"), _edge()
    arrays = ArrayRecord(edge.state_dict())
    strategy.configure_train(1, arrays, ConfigRecord(), None)
    replies = [_reply(strategy, 0, "fog", 3, pixels=_pixels(10, 40)), _reply(strategy, 1, "fog", 3, pixels=_pixels(11, 20)),
               _reply(strategy, 2, "fog", 3)]
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is None  # no fleet-wide edge model in per-device mode
    # device 0: 40 uploads -> 1 step of 32, 8 pending; device 1: 20 -> 0 steps, 20 pending; device 2 uploaded nothing
    assert metrics["cloud_steps"] == 1 and metrics["pending_uploads"] == 8 + 20 and metrics["edge_models"] == 2
    assert len(strategy.tracks[0].buffer) == 40 and len(strategy.tracks[1].buffer) == 20 and 2 not in strategy.tracks
    initial = arrays.to_torch_state_dict()
    moved = [k for k in bn_state_keys(edge) if not torch.equal(strategy.tracks[0].model.state_dict()[k], initial[k])]
    assert moved and all(torch.equal(strategy.tracks[1].model.state_dict()[k], initial[k]) for k in initial)
    second = _by_pid(strategy, strategy.configure_train(2, arrays, ConfigRecord(), None))
    own = second[0].content["arrays"].to_torch_state_dict()
    assert set(own) == set(bn_state_keys(edge)) and torch.equal(own[moved[0]], strategy.tracks[0].model.state_dict()[moved[0]])
    assert torch.equal(second[2].content["arrays"].to_torch_state_dict()[moved[0]], initial[moved[0]])  # untouched device
    with pytest.raises(AttributeError, match="per_device"):
        strategy.edge


def test_unknown_edge_models_mode_names_the_choices():
    with pytest.raises(ValueError, match="shared"):
        _strategy(edge_models="each")


# --------------------------------------------------------------------------- TBR across the wire
def _trained_edge():
    """An edge model whose BN layers carry trained source statistics (markers > 0)."""
    model = _edge()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.fill_(0.5)
                module.running_var.fill_(4.0)
                module.num_batches_tracked.fill_(1000)
    return model


def _first_bn_input(model, x):
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    handle = layer.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return layer, seen[0]


def _tbr_device():
    return dataclasses.replace(_device(), options={**FILTER, "tbr": True})


def _markers(state):
    return {key: int(value) for key, value in state.items() if key.endswith("num_batches_tracked")}


@pytest.mark.parametrize("bn", ["tbr", "batch"])
def test_with_tbr_the_cloud_resets_the_statistics_markers_of_both_models(bn):
    foundation = _foundation()
    trained = _trained_edge()
    with torch.no_grad():
        for module in foundation.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.num_batches_tracked.fill_(1000)
    strategy = CEMA(foundation=foundation, edge_factory=_edge, preprocess=_preprocess, num_classes=10, bn=bn,
                    per_round=1, seed=0, expected_devices=1)
    strategy.devices[0] = DeviceInfo(0, 100, 0, dict(BUDGET))
    strategy._by_node[100] = 0
    first = _by_pid(strategy, strategy.configure_train(1, ArrayRecord(trained.state_dict()), ConfigRecord(), None))
    sent = first[0].content["arrays"].to_torch_state_dict()
    expected = 0 if bn == "tbr" else 1000
    assert set(_markers(sent).values()) == set(_markers(strategy.foundation.state_dict()).values()) == {expected}
    assert torch.equal(sent["features.0.1.running_mean"], trained.state_dict()["features.0.1.running_mean"])


def test_device_takes_tbr_statistics_from_its_first_test_batch_and_keeps_them_until_the_cloud_has_its_own():
    client, context, edge = CEMAClient(_tbr_device()), _context(), _trained_edge()
    reset = {k: (torch.zeros_like(v) if k.endswith("num_batches_tracked") else v) for k, v in edge.state_dict().items()}
    client.handle("train", _train_message(1, reset), context)
    saved = OnlineClient.load_blob(context)["model"]
    source_layer, h = _first_bn_input(_trained_edge(), _stream(0).x)  # the layer's input on the first test batch
    torch.testing.assert_close(saved["features.0.1.running_mean"], h.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(saved["features.0.1.running_var"], h.var(dim=(0, 2, 3)))  # unbiased (official)
    assert int(saved["features.0.1.num_batches_tracked"]) == 1
    # Round 2: the cloud's student has no statistics yet (marker 0): only the affine entries load.
    unset = {k: (torch.zeros_like(v) if k.endswith("num_batches_tracked") else v + 0.25)
             for k, v in _bn_update(edge, 0).items()}
    client.handle("train", _train_message(2, unset), context)
    after = OnlineClient.load_blob(context)["model"]
    assert torch.equal(after["features.0.1.running_mean"], saved["features.0.1.running_mean"])
    torch.testing.assert_close(after["features.0.1.weight"], edge.state_dict()["features.0.1.weight"] + 0.25)
    # Round 3: the student has statistics of its own (marker > 0): they replace the device's.
    own = {k: (v + 1 if k.endswith("num_batches_tracked") else v + 0.5) for k, v in _bn_update(edge, 0).items()}
    client.handle("train", _train_message(3, own), context)
    final = OnlineClient.load_blob(context)["model"]
    torch.testing.assert_close(final["features.0.1.running_mean"], edge.state_dict()["features.0.1.running_mean"] + 0.5)


def test_device_prediction_uses_the_tbr_statistics_not_the_source_ones():
    client, context, edge = CEMAClient(_tbr_device()), _context(), _trained_edge()
    reset = {k: (torch.zeros_like(v) if k.endswith("num_batches_tracked") else v) for k, v in edge.state_dict().items()}
    reply = client.handle("train", _train_message(1, reset), context)
    plain = _trained_edge().eval()  # the source statistics, plain eval mode
    tbr = build_model("cnn", num_classes=10, width=4)
    tbr.load_state_dict(OnlineClient.load_blob(context)["model"])  # statistics from the first batch: plain eval now equals TBR
    with torch.no_grad():
        tbr_logits = tbr.eval()(_stream(0).x)
    assert reply.content["metrics"]["correct"] == int((tbr_logits.argmax(1) == _stream(0).y).sum())
    assert not torch.allclose(tbr_logits, plain(_stream(0).x).detach(), atol=1e-2)


# --------------------------------------------------------------------------- labels for the teacher's accuracy
def test_device_sends_the_uploads_labels_in_the_oracle_record_which_costs_no_bytes():
    client, context, edge = CEMAClient(_device()), _context(), _edge()
    reply = client.handle("train", _train_message(1, edge.state_dict()), context)
    mask = UploadFilter(10, **FILTER).select(_model_logits(edge, 0))
    labels = list(reply.content[ORACLE_RECORD][UPLOAD_LABELS])
    assert mask.any() and labels == _stream(0).y[mask].tolist()
    without = RecordDict({k: v for k, v in reply.content.items() if k != ORACLE_RECORD})
    assert payload_bytes(reply.content) == payload_bytes(without)


def _model_logits(model, index):
    model = build_model("cnn", num_classes=10, width=4)
    model.load_state_dict(_edge().state_dict())
    with torch.no_grad():
        return model.eval()(_stream(index).x)


def _labelled_reply(strategy, pid, pixels, labels):
    reply = _reply(strategy, pid, "fog", 0, pixels=pixels)
    reply.content[ORACLE_RECORD] = ConfigRecord({UPLOAD_LABELS: [int(v) for v in labels]})
    return reply


def _labelled_round(labels):
    strategy = _strategy(seed=3)
    strategy.configure_train(1, ArrayRecord(_edge().state_dict()), ConfigRecord(), None)
    predictions = []
    hook = strategy.foundation.register_forward_hook(lambda m, inp, out: predictions.append(out.argmax(1)))
    _, metrics = strategy.aggregate_train(1, [_labelled_reply(strategy, 0, _pixels(10, 40), labels)])
    hook.remove()
    return strategy, metric_values(metrics), predictions[1]  # [0]: the foundation's own step; [1]: the teacher in distillation


def test_teacher_accuracy_scores_the_distillation_teachers_classes_and_labels_never_train():
    labels = np.random.default_rng(5).integers(0, 10, size=40)
    strategy, metrics, taught = _labelled_round(labels)
    assert metrics["teacher_samples"] == 32 and metrics["cloud_steps"] == 1
    assert metrics["teacher_accuracy"] == pytest.approx(float((taught.numpy() == labels[:32]).mean()))
    assert strategy.tracks[SHARED].pending_labels.tolist() == labels[32:].tolist()
    permuted, _, _ = _labelled_round(np.random.default_rng(6).permutation(labels))
    for key, value in strategy.edge.state_dict().items():
        assert torch.equal(value, permuted.edge.state_dict()[key]), key
    for key, value in strategy.foundation.state_dict().items():
        assert torch.equal(value, permuted.foundation.state_dict()[key]), key
    unlabelled = _strategy(seed=3)
    unlabelled.configure_train(1, ArrayRecord(_edge().state_dict()), ConfigRecord(), None)
    _, no_labels = unlabelled.aggregate_train(1, [_reply(unlabelled, 0, "fog", 0, pixels=_pixels(10, 40))])
    assert no_labels["teacher_accuracy"] != no_labels["teacher_accuracy"]  # NaN: no value in the MetricRecord
    no_labels = metric_values(no_labels)
    assert no_labels["teacher_accuracy"] is None and no_labels["teacher_samples"] == 0


# --------------------------------------------------------------------------- the official edge-batch order
def test_each_reply_is_one_edge_batch_in_partition_order_and_empty_ones_still_replay():
    strategy = _strategy()
    strategy.configure_train(1, ArrayRecord(_edge().state_dict()), ConfigRecord(), None)
    strategy.aggregate_train(1, [_reply(strategy, 0, "fog", 0, pixels=_pixels(10, 270))])  # 270 held, 14 pending
    sizes = []
    strategy.edge.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    _, metrics = strategy.aggregate_train(2, [_reply(strategy, 0, "fog", 0), _reply(strategy, 1, "fog", 0,
                                                                                    pixels=_pixels(11, 10))])
    # device 0 uploaded nothing: replay-only on 128; device 1: 24 pending, no cloud batch: replay-only again
    assert sizes == [128, 128] and metrics["replay_steps"] == 2 and metrics["cloud_steps"] == 0
    assert metrics["pending_uploads"] == 24 and len(strategy.tracks[SHARED].buffer) == 280


def test_cloud_loss_reference_follows_e_max():
    strategy = CEMA(foundation=_foundation(), edge_factory=_edge, preprocess=_preprocess, num_classes=10,
                    e_max_fraction=0.3, per_round=1, seed=0, expected_devices=1)
    assert strategy.e0 == pytest.approx(0.3 * np.log(10))
    with pytest.raises(ValueError, match="e_max_fraction"):
        CEMA(foundation=_foundation(), edge_factory=_edge, preprocess=_preprocess, num_classes=10,
             e_max_fraction=1.2, per_round=1, seed=0, expected_devices=1)
