"""Online TTA on Flower messages (no Ray): the device handler across rounds, the cloud's tallies, and the
device options the apps derive from a run's config (algorithm.tta, per dataset family)."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients.base import MALFORMED_MESSAGE, Device, StreamTensors
from clients.online import OnlineClient
from clients.tta import TTAClient, device_seed, method_names
from experiments.algorithms import ALGORITHMS
from experiments.config import compose
from experiments.schema import ConfigError
from models.catalog import build_model
from models.training import TrainSettings
from models.tta.registry import build_adapter
from strategies.base import DeviceInfo
from strategies.metrics import metric_values
from strategies.tta import OnlineTTA

torch.set_num_threads(1)
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e7}
BATCH = 8
DOMAINS = ("fog", "snow")


def _stream(index):
    rng = np.random.default_rng([3, index])
    pixels = rng.integers(0, 256, size=(BATCH, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(rng.integers(0, 10, size=BATCH))
    return StreamTensors(x=x, y=y, pixels=pixels, domain=DOMAINS[index // 2 % 2], index=index)


def _model():
    return build_model("cnn", num_classes=10, width=4)


def _device(method, hyper=None, pid=7):
    return Device(
        partition_id=pid, seed=0, budget=BUDGET, data=None, num_examples=lambda slot: 0,
        build_model=_model, train=TrainSettings(epochs=1, lr=1e-3, batch_size=8), flops_per_sample=1e6,
        load_factor=lambda r: 2.0, is_available=lambda r: True, slot_of_round=lambda r: 0,
        options={"method": method, "hyper": hyper or {}}, stream=_stream,
    )


def _source_arrays():
    torch.manual_seed(0)
    return ArrayRecord(_model().state_dict())


def _message(server_round, arrays=None, node=1):
    content = RecordDict({"config": ConfigRecord({"round": server_round})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _serve(method, rounds=3, hyper=None):
    """Replies and the saved model after each round (arrays only in round 1)."""
    client, context, source = TTAClient(_device(method, hyper)), _context(), _source_arrays()
    replies, models = [], []
    for r in range(1, rounds + 1):
        replies.append(client.handle("train", _message(r, source if r == 1 else None), context))
        models.append(OnlineClient.load_blob(context)["model"])
    return replies, models, context, source


# --------------------------------------------------------------------------- the device
def test_device_processes_its_stream_in_order_across_rounds():
    replies, _, context, _ = _serve("source")
    assert [r.content["stream"]["index"] for r in replies] == [0, 1, 2]
    assert [r.content["stream"]["domain"] for r in replies] == ["fog", "fog", "snow"]
    assert OnlineClient.stream_index(context) == 3
    metrics = replies[0].content["metrics"]
    assert metrics["num-examples"] == BATCH and metrics["partition_id"] == 7 and metrics["uploads"] == 0
    assert metrics["accuracy"] == metrics["correct"] / BATCH
    assert abs(metrics["compute_time_s"] - 0.016) < 1e-12  # 8 samples x 1e6 FLOPs / 1e9 FLOP/s x load 2
    assert "uploads" not in replies[0].content.array_records


def test_first_message_without_arrays_is_an_error_and_does_not_advance():
    context = _context()
    reply = TTAClient(_device("tent")).handle("train", _message(1), context)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and "arrays" in reply.error.reason
    assert OnlineClient.stream_index(context) == 0 and OnlineClient.load_blob(context) is None


def test_source_keeps_the_model_and_tent_changes_it_every_round():
    sent = _source_arrays().to_torch_state_dict()
    _, source_models, _, _ = _serve("source")
    for state in source_models:
        assert all(torch.equal(state[k], sent[k]) for k in sent)
    _, tent_models, _, _ = _serve("tent", hyper={"lr": 1e-2})
    weights = [k for k in sent if k.endswith((".weight", ".bias"))]
    chain = [sent, *tent_models]
    for before, after in zip(chain, chain[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in weights)


def _source_predictions(x, batch_statistics=False):
    model = _model()
    model.load_state_dict(_source_arrays().to_torch_state_dict())
    model.train(batch_statistics)
    with torch.no_grad():
        return model(x).argmax(1)


def _labelled_first_batch(method, hyper, labels):
    """Run ``method`` on batch 0 labelled ``labels``; its reply and the model it saved."""
    first = _stream(0)
    labelled = StreamTensors(first.x, labels, first.pixels, first.domain, 0)
    device = dataclasses.replace(_device(method, hyper), stream=lambda index: labelled)
    context = _context()
    reply = TTAClient(device).handle("train", _message(1, _source_arrays()), context)
    saved = _model()
    saved.load_state_dict(OnlineClient.load_blob(context)["model"])
    return reply, saved


def test_online_prediction_is_made_before_adapting():
    # Tent with a huge step: labels = the source's predictions with batch statistics (class 2 for
    # all of batch 0, Tent's own forward before its step); after the step 6 of 8 turn to class 7
    first = _stream(0)
    labels = _source_predictions(first.x, batch_statistics=True)
    reply, adapted = _labelled_first_batch("tent", {"optimizer": "adam", "lr": 5.0}, labels)
    assert reply.content["metrics"]["correct"] == BATCH
    with torch.no_grad():
        assert int((adapted.train()(first.x).argmax(1) == labels).sum()) < BATCH  # the test can fail


def test_onda_predicts_with_the_batch_folded_in():
    # ONDA with momentum 1 replaces the BN running statistics by the batch's before normalising it
    # (as the references do): the source model in eval mode predicts class 8 for all of batch 0,
    # the folded one class 2, which the reply scores
    first = _stream(0)
    labels = _source_predictions(first.x, batch_statistics=True)
    assert not torch.equal(labels, _source_predictions(first.x))
    reply, adapted = _labelled_first_batch("onda", {"momentum": 1.0}, labels)
    assert reply.content["metrics"]["correct"] == BATCH
    with torch.no_grad():
        assert torch.equal(adapted.eval()(first.x).argmax(1), labels)


def test_eta_upload_sends_exactly_the_kept_samples():
    # E0 = 0.993 ln 10 keeps 5 of the 8 near-uniform first predictions (entropies 0.992-0.995 ln 10)
    client, context, source = TTAClient(_device("eta_upload", {"entropy_fraction": 0.993})), _context(), _source_arrays()
    kept = []
    for r in range(1, 4):
        reply = client.handle("train", _message(r, source if r == 1 else None), context)
        mask = OnlineClient.load_blob(context)["method"]["last_kept_mask"].numpy()
        kept.append(int(mask.sum()))
        assert reply.content["metrics"]["uploads"] == int(mask.sum())
        if mask.any():
            pixels = reply.content["uploads"]["pixels"].numpy()
            assert pixels.dtype == np.uint8 and np.array_equal(pixels, _stream(r - 1).pixels[mask])
        else:
            assert "uploads" not in reply.content.array_records
    assert 0 < kept[0] < BATCH  # a partial mask: the upload is a real selection


def test_eta_without_upload_sends_nothing():
    replies, _, _, _ = _serve("eta", rounds=1, hyper={"entropy_fraction": 1.0})
    assert replies[0].content["metrics"]["uploads"] == 0 and "uploads" not in replies[0].content.array_records


def test_same_stream_same_replies():
    a, _, _, _ = _serve("tent", rounds=2)
    b, _, _, _ = _serve("tent", rounds=2)
    assert [r.content["metrics"]["correct"] for r in a] == [r.content["metrics"]["correct"] for r in b]


def test_bad_options_raise_clear_errors():
    assert "eta_upload" in method_names() and "tent" in method_names()
    with pytest.raises(ValueError, match="'bogus'"):
        TTAClient(_device("bogus"))
    reply = TTAClient(_device("tent", {"nope": 1})).handle("train", _message(1, _source_arrays()), _context())
    assert reply.has_error() and "nope" in reply.error.reason


# --------------------------------------------------------------------------- the cloud
def _strategy(pids=(0, 1)):
    strategy = OnlineTTA(per_round=len(pids), seed=0, expected_devices=len(pids))
    for pid in pids:
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 0, dict(BUDGET))
        strategy._by_node[100 + pid] = pid
    return strategy


def _scripted(strategy, pid, domain, correct, n=BATCH, uploads=0):
    msg = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=strategy.devices[pid].node_id,
                  message_type=MessageType.TRAIN)
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": n, "correct": correct, "accuracy": correct / n, "uploads": uploads}),
        "stream": ConfigRecord({"domain": domain, "index": 0}),
    })
    if uploads:
        content["uploads"] = ArrayRecord({"pixels": Array(np.zeros((uploads, 32, 32, 3), dtype=np.uint8))})
    return Message(content, reply_to=msg)


def test_strategy_serves_arrays_once_per_device_that_answered():
    strategy, arrays = _strategy(), _source_arrays()
    first = strategy.configure_train(1, arrays, ConfigRecord(), None)
    assert all("arrays" in m.content.array_records for m in first)
    assert all(m.content["config"]["round"] == 1 for m in first)
    strategy.aggregate_train(1, [_scripted(strategy, 0, "fog", 1)])  # device 1 did not answer
    second = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord(), None)}
    assert "arrays" not in second[100].content.array_records
    assert "arrays" in second[101].content.array_records
    assert strategy.served == {0}


def test_strategy_accumulates_online_accuracy_per_domain():
    strategy = _strategy()
    new, r1 = strategy.aggregate_train(1, [_scripted(strategy, 0, "fog", 6), _scripted(strategy, 1, "snow", 2, uploads=3)])
    assert new is None
    m1 = metric_values(r1)
    assert m1["online_accuracy"] == 8 / 16
    assert m1["online_accuracy_by_domain"] == {"fog": 0.75, "snow": 0.25}
    assert m1["uploaded_samples"] == 3 and m1["uploaded_bytes"] == 3 * 32 * 32 * 3
    assert m1["accuracy"] == 0.5 and m1["devices"] == 2
    _, r2 = strategy.aggregate_train(2, [_scripted(strategy, 0, "snow", 4), _scripted(strategy, 1, "snow", 8)])
    m2 = metric_values(r2)
    assert m2["online_accuracy"] == 20 / 32  # (6 + 2 + 4 + 8) / 32
    assert m2["online_accuracy_by_domain"] == {"fog": 0.75, "snow": 14 / 24}
    assert m2["uploaded_samples"] == 0 and m2["uploaded_bytes"] == 0 and m2["uploaded_samples_by_device"] == {}
    record = strategy.round_record(2, r2, None, None)
    assert record["train_online_accuracy"] == 20 / 32 and record["train_online_accuracy_by_domain"]["fog"] == 0.75


class _FakeGrid:
    """Hands every message to its node's in-process handler with that node's own context."""

    def __init__(self, handlers):
        self.handlers = handlers
        self.contexts = {node: _context() for node in handlers}

    def send_and_receive(self, messages, timeout=None):
        return [self.handlers[m.metadata.dst_node_id].handle("train", m, self.contexts[m.metadata.dst_node_id])
                for m in messages]


def test_rounds_on_a_fake_grid_download_the_model_once():
    strategy = _strategy()
    grid = _FakeGrid({100 + pid: TTAClient(_device("tent", pid=pid)) for pid in (0, 1)})
    arrays, downlink = _source_arrays(), []
    for r in (1, 2):
        strategy.ledger = type(strategy.ledger)()
        replies = strategy.exchange(grid, list(strategy.configure_train(r, arrays, ConfigRecord(), grid)), "train")
        new, metrics = strategy.aggregate_train(r, replies)
        assert new is None and metrics["devices"] == 2 and not strategy.ledger.failures
        downlink.append(strategy.ledger.downlink_bytes)
    assert downlink[1] < downlink[0] / 10  # round 2 carries configs only
    assert [OnlineClient.stream_index(c) for c in grid.contexts.values()] == [2, 2]
    assert sum(n for _, n in strategy.online.values()) == 4 * BATCH


# --------------------------------------------------------------------------- the apps' device options
def _options(method, dataset="digits", overrides=()):
    cfg = compose([f"algorithm={method}", "scenario=online", *overrides])
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, name=dataset))
    return ALGORITHMS[method].client_options(cfg)


def test_device_options_take_each_familys_reference_values():
    cifar, imagenet = _options("eta")["hyper"], _options("eta", "imagenet_c")["hyper"]
    assert cifar == {"optimizer": "adam", "lr": 1e-3, "d_margin": 0.4, "entropy_fraction": 0.4}
    assert imagenet == {"optimizer": "sgd", "lr": 2.5e-4, "d_margin": 0.05, "entropy_fraction": 0.4}
    assert _options("eta", "cifar100")["hyper"]["d_margin"] == 0.1
    assert _options("eta_upload", "imagenet_c") == {"method": "eta_upload", "hyper": imagenet}
    assert _options("tent", "imagenet_c")["hyper"] == {"optimizer": "sgd", "lr": 2.5e-4}
    cotta = _options("cotta", "imagenet_c")["hyper"]
    assert (cotta["optimizer"], cotta["lr"], cotta["restore_prob"], cotta["anchor_threshold"], cotta["loss"]) == \
        ("nesterov", 0.01, 0.001, 0.1, "symmetric")
    assert _options("cotta", "cifar100")["hyper"]["anchor_threshold"] == 0.72
    assert _options("eta", "imagenet_c", ["algorithm.eta.d_margin=0.2"])["hyper"]["d_margin"] == 0.2
    assert _options("bn_adapt")["hyper"] == {"stats": "mixed", "momentum": 0.5}
    assert _options("pl")["hyper"] == {"threshold": 0.0, "optimizer": "sgd", "lr": 1e-3}
    assert _options("source") == {"method": "source", "hyper": {}}


@pytest.mark.parametrize("method", sorted(method_names()))
def test_every_methods_device_options_build_its_adapter(method):
    options = _options(method)
    adapter = TTAClient(_device(method, options["hyper"])).adapter_name
    assert build_adapter(adapter, _model(), 10, **options["hyper"]) is not None


@pytest.mark.parametrize("override, key", [
    ("algorithm.cotta.loss=kl", "algorithm.cotta.loss"),
    ("algorithm.lame.affinity=cosine", "algorithm.lame.affinity"),
    ("algorithm.pl.threshold=1.0", "algorithm.pl.threshold"),
    ("algorithm.bn_adapt.stats=running", "algorithm.bn_adapt.stats"),
    ("algorithm.onda.momentum=0", "algorithm.onda.momentum"),
    ("algorithm.tent.optimizer=rmsprop", "algorithm.tent.optimizer"),
    ("algorithm.eta.d_margin=0", "algorithm.eta.d_margin"),
    ("algorithm.cotta.restore_prob=1.5", "algorithm.cotta.restore_prob"),
])
def test_validation_names_a_bad_tta_option(override, key):
    method = key.split(".")[1]  # each method's settings block exists when that method is selected
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([f"algorithm={method}", "scenario=online", override])


def test_cotta_is_seeded_per_device():
    seeds = {pid: device_seed(_device("cotta", pid=pid)) for pid in (7, 8)}
    assert seeds[7] != seeds[8]
    client, context = TTAClient(_device("cotta", pid=7)), _context()
    client.handle("train", _message(1, _source_arrays()), context)
    assert client.restore_adapter(_message(2), context).seed == seeds[7]

