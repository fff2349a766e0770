"""Edge handlers on a hand-built device: replies, errors, availability, virtual time."""

import dataclasses

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.base import DEVICE_DECLINED, MALFORMED_MESSAGE, ClientHandler, Device, DeviceTensors, MalformedMessage
from clients.cema import CEMAClient
from clients.elastic import ElasticClient
from clients.local import LocalOnlyClient, LocalTrainingClient
from clients.online import STATE_KEY, OnlineClient
from clients.tta import TTAClient
from models.catalog import build_model
from models.training import TrainSettings

torch.set_num_threads(1)
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e7, "device_class": "x"}


def _data(slot):
    g = torch.Generator().manual_seed(slot)
    return DeviceTensors(
        train_x=torch.randn(20, 3, 32, 32, generator=g),
        train_y=torch.randint(0, 10, (20,), generator=g),
        test_x=torch.randn(8, 3, 32, 32, generator=g),
        test_y=torch.randint(0, 10, (8,), generator=g),
    )


def _device(available=True, load=2.0):
    return Device(
        partition_id=7,
        seed=0,
        budget=BUDGET,
        data=_data,
        num_examples=lambda slot: 20,
        build_model=lambda: build_model("cnn", num_classes=10, width=4),
        train=TrainSettings(epochs=2, lr=1e-3, batch_size=8),
        flops_per_sample=1e6,
        load_factor=lambda r: load,
        is_available=lambda r: available,
        slot_of_round=lambda r: 0,
    )


def _message(kind=MessageType.TRAIN, with_round=True, arrays=True):
    content = RecordDict()
    if arrays:
        torch.manual_seed(0)
        content["arrays"] = ArrayRecord(build_model("cnn", num_classes=10, width=4).state_dict())
    content["config"] = ConfigRecord({"round": 3} if with_round else {})
    return Message(content, dst_node_id=1, message_type=kind)


def _reply(handler, action, msg):
    reply = handler.handle(action, msg, context=None)
    # Flower fills reply metadata on the node; here we only read content/error.
    return reply


def test_fedavg_client_replies_with_trained_arrays_and_metrics():
    reply = _reply(LocalTrainingClient(_device()), "train", _message())
    assert reply.has_content()
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 20 and metrics["partition_id"] == 7
    assert metrics["samples_trained"] == 40  # 20 samples x 2 epochs
    # 40 samples x 1e6 FLOPs / 1e9 FLOP/s x load 2 = 0.08 s
    assert abs(metrics["compute_time_s"] - 0.08) < 1e-12
    sent = _message().content["arrays"].to_torch_state_dict()
    got = reply.content["arrays"].to_torch_state_dict()
    assert set(sent) == set(got)
    assert any(not torch.equal(sent[k], got[k]) for k in sent)  # training changed weights


def test_training_is_deterministic():
    a = _reply(LocalTrainingClient(_device()), "train", _message()).content["arrays"].to_torch_state_dict()
    b = _reply(LocalTrainingClient(_device()), "train", _message()).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_local_only_client_sends_no_arrays():
    reply = _reply(LocalOnlyClient(_device()), "train", _message())
    assert "arrays" not in reply.content.array_records
    assert "accuracy" in reply.content["metrics"]


def test_evaluate_reports_local_test_accuracy():
    reply = _reply(ClientHandler(_device()), "evaluate", _message(MessageType.EVALUATE))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 8
    assert metrics["accuracy"] * 8 == round(metrics["accuracy"] * 8)  # k of 8 correct


def test_query_reports_budget_and_partition():
    reply = _reply(ClientHandler(_device()), "query", _message(MessageType.QUERY, arrays=False))
    assert reply.content["metrics"]["partition_id"] == 7
    assert dict(reply.content["budget"]) == BUDGET


def test_unavailable_device_declines():
    reply = _reply(LocalTrainingClient(_device(available=False)), "train", _message())
    assert reply.has_error() and reply.error.code == DEVICE_DECLINED


def test_malformed_messages_get_error_replies_not_crashes():
    no_round = _reply(LocalTrainingClient(_device()), "train", _message(with_round=False))
    assert no_round.has_error() and no_round.error.code == MALFORMED_MESSAGE
    no_arrays = _reply(LocalTrainingClient(_device()), "train", _message(arrays=False))
    assert no_arrays.has_error() and "no array record" in no_arrays.error.reason
    wrong = _message()
    wrong.content["arrays"] = ArrayRecord(build_model("cnn", num_classes=10, width=8).state_dict())
    wrong_shape = _reply(LocalTrainingClient(_device()), "train", wrong)
    assert wrong_shape.has_error() and "do not fit" in wrong_shape.error.reason


# --------------------------------------------------------------------------- online handlers' shared base
class _Store:
    """A device's durable store in memory: what was saved after each round."""

    def __init__(self):
        self.saved = {}

    def save(self, server_round, index, blob):
        self.saved[server_round] = (index, blob)

    def load_before(self, server_round):
        earlier = [r for r in self.saved if r < server_round]
        return self.saved[max(earlier)] if earlier else None


def _online(store=None, stream=None):
    device = dataclasses.replace(_device(), state_store=store, stream=stream)
    return OnlineClient(device)


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_the_online_handlers_share_one_base():
    assert all(issubclass(cls, OnlineClient) for cls in (CEMAClient, TTAClient, ElasticClient))
    assert not issubclass(LocalTrainingClient, OnlineClient)


def test_kept_progress_lives_in_context_state_and_in_the_store():
    store, context = _Store(), _context()
    client = _online(store)
    assert client.stream_index(context) == 0 and client.load_blob(context) is None
    client.keep_progress(context, 3, 5, {"w": torch.ones(2)})
    assert client.stream_index(context) == 5 and torch.equal(client.load_blob(context)["w"], torch.ones(2))
    index, blob = store.saved[3]
    assert index == 5 and blob == context.state[STATE_KEY]["blob"]


def test_a_restarted_device_reloads_what_it_saved_before_the_round():
    store = _Store()
    _online(store).keep_progress(_context(), 2, 4, {"w": torch.zeros(1)})
    _online(store).keep_progress(_context(), 5, 9, None)
    fresh = _context()  # a restart: context.state is empty
    _online(store).restore_progress(fresh, 5)  # resumed at round 5: round 2's save is the newest before it
    assert OnlineClient.stream_index(fresh) == 4 and torch.equal(OnlineClient.load_blob(fresh)["w"], torch.zeros(1))
    kept = _context()
    _online(store).keep_progress(kept, 7, 1, None)
    _online(store).restore_progress(kept, 8)  # a live device keeps its own state
    assert OnlineClient.stream_index(kept) == 1


def test_without_a_store_nothing_is_saved_and_without_a_stream_the_device_says_so():
    context = _context()
    client = _online()
    client.keep_progress(context, 1, 2, None)
    client.restore_progress(context, 2)
    assert client.stream_index(context) == 2
    with pytest.raises(MalformedMessage, match="no online stream"):
        client.next_batch(context)
