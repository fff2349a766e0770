"""Faults survived: injected device faults, the cloud's reply checks, malformed messages.

Fast tests drive real handlers, a real FaultInjector and a real FedAvg strategy in process
(an in-process grid answers an exception with an error reply, as Flower does, and a
vanished device with no reply). One slow test runs the whole stack on Ray with every
fault kind (about 40-80 s on 2 shared cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from clients.an import AdaptiveNetClient
from clients.base import HANDLER_FAILED, MALFORMED_MESSAGE, ClientHandler, Device, DeviceTensors, StreamTensors
from clients.cema import CEMAClient
from clients.eclm import ECLMClient
from clients.heterofl import HeteroFLClient
from clients.local import LocalOnlyClient, LocalTrainingClient
from clients.tta import TTAClient
from experiments.fleet.faults import (
    FAULT_KINDS,
    VANISH_EXIT_CODE,
    FaultInjector,
    InjectedFault,
    corrupt_shapes,
    corrupt_values,
    fault_for,
)
from models.catalog import build_model
from models.eclm.families import build_modular
from models.training import TrainSettings
from models.width.submodel import extract
from strategies.base import DeviceInfo
from strategies.eclm import submodel_arrays
from strategies.fedavg import FedAvg
from strategies.reply_checks import reply_problem

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e12, "uplink_bps": 1e6, "downlink_bps": 1e7, "device_class": "x"}
MLP = dict(num_classes=4, width=8, in_channels=3, modules_per_layer=4, shrink=0.5, k=2, image_size=8)
ECLM_IDS = ("l0.m0", "l0.m2")


# --------------------------------------------------------------------------- devices and messages
def _cnn():
    return build_model("cnn", num_classes=4, width=4)


def _data(size):
    def data(slot):
        g = torch.Generator().manual_seed(slot)
        return DeviceTensors(
            train_x=torch.randn(12, 3, size, size, generator=g), train_y=torch.randint(0, 4, (12,), generator=g),
            test_x=torch.randn(6, 3, size, size, generator=g), test_y=torch.randint(0, 4, (6,), generator=g),
        )
    return data


def _stream(index):
    rng = np.random.default_rng([5, index])
    pixels = rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    return StreamTensors(x=x, y=torch.from_numpy(rng.integers(0, 4, size=8)), pixels=pixels, domain="fog", index=index)


def _device(build=_cnn, size=16, pid=7, options=None):
    return Device(
        partition_id=pid, seed=0, budget=BUDGET, data=_data(size), num_examples=lambda slot: 12, build_model=build,
        train=TrainSettings(epochs=1, lr=1e-3, batch_size=4), flops_per_sample=1e6,
        load_factor=lambda r: 1.0, is_available=lambda r: True, slot_of_round=lambda r: 0,
        options=options or {}, stream=_stream,
    )


def _state(build):
    torch.manual_seed(0)
    return build().state_dict()


def _message(arrays, config, kind=MessageType.TRAIN, record="arrays"):
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content[record] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(content, dst_node_id=1, message_type=kind)


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _eclm_arrays():
    cloud = build_modular("modular_mlp", **MLP)
    record = submodel_arrays(ArrayRecord(cloud.state_dict()), ECLM_IDS, cloud.layer_sizes())
    return {k: v.numpy() for k, v in record.items()}


def _heterofl_arrays():
    return extract({k: v.numpy() for k, v in _state(_cnn).items()}, 0.5)


#: Each client kind: (handler factory, its arrays, its config beyond the round).
KINDS = {
    "fedavg": (lambda: LocalTrainingClient(_device()), lambda: _state(_cnn), {}),
    "local": (lambda: LocalOnlyClient(_device()), lambda: _state(_cnn), {}),
    "heterofl": (lambda: HeteroFLClient(_device()), _heterofl_arrays, {"rate": 0.5}),
    "eclm": (
        lambda: ECLMClient(_device(lambda: build_modular("modular_mlp", **MLP), size=8, options={"round_budget_s": 1e9})),
        _eclm_arrays,
        {"modules": ",".join(ECLM_IDS)},
    ),
    "cema": (lambda: CEMAClient(_device()), lambda: _state(_cnn), {}),
    "tta": (lambda: TTAClient(_device(options={"method": "tent"})), lambda: _state(_cnn), {}),
    "an": (
        lambda: AdaptiveNetClient(_device(lambda: build_model("multibranch_cnn", num_classes=4, width=4)), max_candidates=2),
        lambda: _state(lambda: build_model("multibranch_cnn", num_classes=4, width=4)),
        {},
    ),
}


def _first_float(arrays):
    return next(k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and np.asarray(v).ndim)


def _with_nan(arrays):
    key = _first_float(arrays)
    bad = np.array(arrays[key], dtype=np.asarray(arrays[key]).dtype, copy=True)
    bad.reshape(-1)[0] = np.nan
    return {**arrays, key: bad}


def _with_wrong_shape(arrays):
    key = _first_float(arrays)
    return {**arrays, key: np.asarray(arrays[key]).reshape(-1)[:-1].copy()}


#: Malformed variants of a good (arrays, config) pair, each answered MALFORMED_MESSAGE by every kind.
MALFORMED = {
    "no config": lambda a, c: (a, None),
    "round as text": lambda a, c: (a, {**c, "round": "1"}),
    "round as bool": lambda a, c: (a, {**c, "round": True}),
    "negative round": lambda a, c: (a, {**c, "round": -1}),
    "no arrays": lambda a, c: (None, c),
    "NaN in arrays": lambda a, c: (_with_nan(a), c),
    "wrong shape": lambda a, c: (_with_wrong_shape(a), c),
}


def _malformed_message(kind, variant):
    _, arrays, extra = KINDS[kind]
    arrays, config = MALFORMED[variant]({k: np.asarray(v) for k, v in arrays().items()}, {"round": 1, **extra})
    msg = _message(arrays, config or {})
    if config is None:
        del msg.content["config"]
    return msg


# --------------------------------------------------------------------------- client side: bad input
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_client_kind_answers_a_good_message(kind):
    factory, arrays, extra = KINDS[kind]
    reply = factory().handle("train", _message(arrays(), {"round": 1, **extra}), _context())
    assert reply.has_content(), reply.error.reason


@pytest.mark.parametrize("variant", sorted(MALFORMED))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_client_kind_answers_malformed_messages_with_an_error_reply(kind, variant):
    reply = KINDS[kind][0]().handle("train", _malformed_message(kind, variant), _context())
    assert reply.has_error(), f"{kind} accepted a message with {variant}"
    assert reply.error.code == MALFORMED_MESSAGE, reply.error.reason


@pytest.mark.parametrize(
    "kind, config, match",
    [
        ("heterofl", {"rate": "half"}, "rate"),
        ("heterofl", {"rate": 0.3}, "rate"),
        ("heterofl", {"rate": 0.5, "offset": -1}, "offset"),
        ("eclm", {"modules": 5}, "modules"),
        ("eclm", {"modules": "l9.m9"}, "modules"),
        ("an", {"compute_budget_s": "soon"}, "compute_budget_s"),
    ],
)
def test_wrongly_typed_config_values_get_an_error_reply(kind, config, match):
    factory, arrays, _ = KINDS[kind]
    reply = factory().handle("train", _message(arrays(), {"round": 1, **config}), _context())
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and match in reply.error.reason


def test_arrays_of_the_wrong_dtype_and_unknown_actions_are_malformed():
    doubles = {k: v.double() if v.is_floating_point() else v for k, v in _state(_cnn).items()}
    reply = LocalTrainingClient(_device()).handle("train", _message(doubles, {"round": 1}), None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and "float64" in reply.error.reason
    reply = LocalTrainingClient(_device()).handle("fit", _message(_state(_cnn), {"round": 1}), None)
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and "unknown action 'fit'" in reply.error.reason


def test_a_selector_with_nan_is_a_malformed_profiling_query():
    selector = {k: v for k, v in build_modular("modular_mlp", **MLP).state_dict().items() if k.startswith("selector.")}
    handler = KINDS["eclm"][0]()
    good = handler.handle("query", _message(selector, {"round": 1}, MessageType.QUERY, record="selector"), None)
    assert good.has_content(), good.error.reason
    bad = handler.handle("query", _message(_with_nan(selector), {"round": 1}, MessageType.QUERY, "selector"), None)
    assert bad.has_error() and bad.error.code == MALFORMED_MESSAGE and "NaN" in bad.error.reason


def test_a_handler_error_becomes_an_error_reply_not_a_crash():
    class Broken(ClientHandler):
        def train(self, msg, context):
            raise RuntimeError("disk full")

    reply = Broken(_device()).handle("train", _message(None, {"round": 1}), None)
    assert reply.has_error() and reply.error.code == HANDLER_FAILED
    assert reply.error.reason == "handler failed: RuntimeError: disk full"


# --------------------------------------------------------------------------- the fault draws
def test_fault_draws_are_pinned_by_seed_round_and_device():
    plan = [fault_for(21, 1, pid, 0.6, FAULT_KINDS) for pid in range(7)]
    assert plan == [None, "wrong_shape", "nan_values", "timeout", None, "vanish", "raise"]
    assert [fault_for(21, 1, pid, 0.6, FAULT_KINDS) for pid in range(7)] == plan  # same call, same faults
    assert [fault_for(21, 2, pid, 0.6, FAULT_KINDS) for pid in range(7)] != plan  # another round, other faults
    assert all(fault_for(21, 0, pid, 1.0, FAULT_KINDS) is None for pid in range(50))  # discovery is never faulty
    assert all(fault_for(3, 4, pid, 0.0, FAULT_KINDS) is None for pid in range(50))
    assert all(fault_for(3, 4, pid, 1.0, ("nan_values",)) == "nan_values" for pid in range(50))


def test_fault_fraction_is_the_share_of_faulty_devices():
    faulty = [fault_for(0, 3, pid, 0.25, FAULT_KINDS) for pid in range(4000)]
    share = sum(f is not None for f in faulty) / len(faulty)
    assert abs(share - 0.25) < 0.02  # binomial sd = sqrt(.25 * .75 / 4000) = 0.007
    counts = [faulty.count(kind) for kind in FAULT_KINDS]
    assert min(counts) > 0.8 * max(counts)  # kinds drawn uniformly


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fraction": 1.5}, "fraction"),
        ({"kinds": ("explode",)}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"actions": ("fit",)}, "actions"),
        ({"stall_s": -1.0}, "stall_s"),
    ],
)
def test_injector_rejects_bad_settings(kwargs, match):
    base = dict(fraction=0.5, kinds=("raise",), actions=("train",), seed=0, stall_s=0.0)
    with pytest.raises(ValueError, match=match):
        FaultInjector(**{**base, **kwargs})


def _injector(kind, actions=("train",), stall_s=0.0, vanish=None):
    extra = {} if vanish is None else {"vanish": vanish}
    return FaultInjector(fraction=1.0, kinds=(kind,), actions=actions, seed=0, stall_s=stall_s, **extra)


def _train(handler, injector, msg=None):
    msg = msg or _message(_state(_cnn), {"round": 1})
    return injector.handle("train", msg, 7, lambda: handler.handle("train", msg, None))


def test_raise_and_vanish_stop_before_the_handler_runs():
    def never():
        raise AssertionError("the handler must not run")

    msg = _message(_state(_cnn), {"round": 1})
    with pytest.raises(InjectedFault, match="device 7, train, round 1"):
        _injector("raise").handle("train", msg, 7, never)

    class Gone(Exception):
        pass

    def vanish():
        raise Gone

    with pytest.raises(Gone):
        _injector("vanish", vanish=vanish).handle("train", msg, 7, never)


def test_a_vanishing_device_process_exits_at_once():
    code = "from experiments.fleet.faults import vanish_process; vanish_process(); print('still here')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == VANISH_EXIT_CODE and "still here" not in done.stdout


def test_timeout_replies_late_with_the_real_content():
    started = time.perf_counter()
    reply = _train(LocalTrainingClient(_device()), _injector("timeout", stall_s=0.3))
    assert time.perf_counter() - started >= 0.3
    assert reply.has_content() and reply.content["metrics"]["num-examples"] == 12


def test_wrong_shape_and_nan_values_corrupt_the_reply():
    sent = _message(_state(_cnn), {"round": 1})
    shaped = _train(LocalTrainingClient(_device()), _injector("wrong_shape"), sent)
    first = next(iter(_state(_cnn)))
    n = _state(_cnn)[first].numel()
    assert tuple(shaped.content["arrays"][first].shape) == (n - 1,)
    assert reply_problem(shaped.content, sent.content).startswith("wrong shape: arrays/" + first)

    nan = _train(LocalTrainingClient(_device()), _injector("nan_values"), sent)
    arrays = nan.content["arrays"]
    floats = [k for k, a in arrays.items() if a.dtype == "float32"]
    assert floats and all(np.isnan(arrays[k].numpy()).all() for k in floats)
    assert all(math.isnan(v) for v in nan.content["metrics"].values())
    assert reply_problem(nan.content, sent.content).startswith("nan: arrays/")


def test_corruption_keeps_untouched_arrays_and_says_when_there_is_nothing_to_corrupt():
    content = RecordDict({
        "arrays": ArrayRecord({"n": Array(np.array(5, dtype=np.int64)), "w": Array(np.ones((2, 3), np.float32))}),
        "metrics": MetricRecord({"num-examples": 3}),
    })
    assert corrupt_values(content) == ["arrays/w", "metrics"]
    assert content["arrays"]["n"].shape == () and int(content["arrays"]["n"].numpy()) == 5
    assert corrupt_shapes(content) == ["arrays/n"] and content["arrays"]["n"].shape == (0,)
    assert corrupt_shapes(RecordDict({"metrics": MetricRecord({"a": 1.0})})) == []


def test_faults_hit_only_the_chosen_actions_and_readable_rounds():
    injector = _injector("raise", actions=("evaluate",))
    handler = LocalTrainingClient(_device())
    assert _train(handler, injector).has_content()  # train is not a faulty action here
    no_round = _message(_state(_cnn), {})
    reply = _injector("raise").handle("train", no_round, 7, lambda: handler.handle("train", no_round, None))
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE  # answered, not faulted


# --------------------------------------------------------------------------- cloud side: reply checks
def _f32(*shape, value=1.0):
    return Array(np.full(shape, value, dtype=np.float32))


SENT = RecordDict({
    "arrays": ArrayRecord({"w": _f32(2, 3), "b": _f32(3), "n": Array(np.array(4, dtype=np.int64))}),
    "config": ConfigRecord({"round": 1}),
})


def _reply(arrays=None, metrics=None, **records):
    content = RecordDict({"metrics": MetricRecord(metrics or {"num-examples": 10, "compute_time_s": 0.5})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    for name, record in records.items():
        content[name] = record
    return content


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"w": _f32(2, 3), "b": _f32(3), "n": Array(np.array(9, dtype=np.int64))}, None),
        ({"w": _f32(2, 3)}, None),  # a subset of the sent keys (ECLM drops modules, sBN returns statistics)
        ({"w": _f32(2, 3), "z": _f32(3)}, "unknown key: arrays/z was not sent"),
        ({"w": Array(np.ones((2, 3)))}, "wrong dtype: arrays/w is float64, sent float32"),
        ({"w": _f32(3, 2)}, "wrong shape: arrays/w is (3, 2), sent (2, 3)"),
        ({"w": _f32(2, 3), "b": _f32(3, value=np.nan)}, "nan: arrays/b holds NaN or inf"),
        ({"b": _f32(3, value=np.inf)}, "nan: arrays/b holds NaN or inf"),
    ],
)
def test_reply_arrays_are_checked_against_the_sent_record(arrays, expected):
    assert reply_problem(_reply(arrays), SENT) == expected


def test_uploads_need_uint8_images_and_unknown_records_are_rejected():
    pixels = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    assert reply_problem(_reply(uploads=ArrayRecord({"pixels": Array(pixels)})), SENT) is None
    floats = ArrayRecord({"pixels": Array(pixels.astype(np.float32))})
    assert reply_problem(_reply(uploads=floats), SENT) == "wrong dtype: uploads/pixels is float32, expected uint8"
    flat = ArrayRecord({"pixels": Array(pixels.reshape(-1))})
    assert reply_problem(_reply(uploads=flat), SENT) == "wrong shape: uploads/pixels is (96,), expected 4 dimensions"
    other = _reply(extra=ArrayRecord({"x": _f32(1)}))
    assert reply_problem(other, SENT).startswith("unexpected record: array record 'extra'")


@pytest.mark.parametrize(
    "metrics, expected",
    [
        ({"num-examples": 10, "train_loss": float("nan")}, None),  # NaN loss = no value; means skip it
        ({"num-examples": float("nan")}, "nan: metrics/num-examples is nan"),
        ({"num-examples": 10, "compute_time_s": float("inf")}, "nan: metrics/compute_time_s is inf"),
        ({"num-examples": 10, "compute_time_s": -1.0}, "bad metric: metrics/compute_time_s is -1.0, must be >= 0"),
        ({"correct": [3, -2]}, "bad metric: metrics/correct is -2, must be >= 0"),
    ],
)
def test_counted_metrics_must_be_finite_and_not_negative(metrics, expected):
    assert reply_problem(_reply(metrics=metrics), SENT) == expected


class _ScriptedGrid:
    """Answers each message with ``answer(message)`` (a list of replies per message)."""

    def __init__(self, answer):
        self.answer = answer

    def send_and_receive(self, messages, timeout=None):
        return [reply for msg in messages for reply in self.answer(msg)]


def _fedavg(devices=3):
    strategy = FedAvg(per_round=devices, seed=0, expected_devices=devices)
    for pid in range(devices):
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 10, dict(BUDGET))
        strategy._by_node[100 + pid] = pid
    return strategy


def test_exchange_keeps_only_replies_that_pass_and_counts_the_rest_as_rejected():
    strategy = _fedavg()
    cloud = ArrayRecord({"w": _f32(2, 3), "b": _f32(3)})
    messages = list(strategy.configure_train(1, cloud, ConfigRecord(), None))
    bodies = {
        100: {"w": _f32(2, 3, value=2.0), "b": _f32(3)},
        101: {"w": _f32(2, 3, value=np.nan), "b": _f32(3)},
        102: {"w": _f32(6), "b": _f32(3)},
    }

    def answer(msg):
        node = msg.metadata.dst_node_id
        reply = Message(_reply(bodies[node]), reply_to=msg)
        if node != 100:
            return [reply]
        stray = Message(_reply(bodies[node]), reply_to=msg)
        stray.metadata.__dict__["_src_node_id"] = 999  # a node the cloud never asked
        return [reply, stray]

    kept = strategy.exchange(_ScriptedGrid(answer), messages, "train")
    assert [strategy.partition_of(r) for r in kept] == [0]
    reasons = {f["partition_id"]: f["reason"] for f in strategy.ledger.failures}
    assert reasons[1] == "rejected: nan: arrays/w holds NaN or inf"
    assert reasons[2] == "rejected: wrong shape: arrays/w is (6,), sent (2, 3)"
    assert reasons[None] == "rejected: reply from node 999, which was not asked"
    assert strategy.ledger.completed == {0} and set(strategy.ledger.device_time_s) == {0}
    assert strategy.ledger.uplink_bytes > 3 * 4 * 9  # the rejected replies' bytes crossed the link too


# --------------------------------------------------------------------------- a faulty run in process
class _Vanished(Exception):
    """A device process that disappeared: no reply at all."""


class _FlowerLikeGrid:
    """Delivers each message through the ClientApp path (fault injector -> handler), as Flower would.

    An exception becomes an error reply (Flower's ClientAppException); a vanished device
    sends nothing.
    """

    def __init__(self, handlers, injector):
        self.handlers, self.injector = handlers, injector

    def get_node_ids(self):
        return sorted(self.handlers)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            handler = self.handlers[msg.metadata.dst_node_id]
            action = msg.metadata.message_type

            def respond(handler=handler, msg=msg, action=action):
                return handler.handle(action, msg, None)

            try:
                replies.append(self.injector.handle(action, msg, handler.device.partition_id, respond))
            except _Vanished:
                continue
            except Exception as exc:  # noqa: BLE001  (what Flower does with a raising ClientApp)
                replies.append(Message(Error(code=1, reason=f"ClientAppException: {exc}"), reply_to=msg))
        return replies


def test_a_faulty_fedavg_run_completes_and_no_nan_reaches_the_cloud_model():
    kinds = ("raise", "vanish", "wrong_shape", "nan_values")
    seed, fraction, devices = 11, 0.5, 5

    def vanish():
        raise _Vanished

    injector = FaultInjector(fraction=fraction, kinds=kinds, actions=("train",), seed=seed, stall_s=0.0, vanish=vanish)
    plan = {r: {p: fault_for(seed, r, p, fraction, kinds) for p in range(devices)} for r in (1, 2)}
    assert {k for r in plan.values() for k in r.values()} == {None, *kinds}  # every kind happens
    handlers = {100 + p: LocalTrainingClient(_device(pid=p)) for p in range(devices)}
    records = []
    strategy = FedAvg(per_round=devices, seed=seed, expected_devices=devices, on_round=records.append)
    initial = ArrayRecord(_state(_cnn))
    final = strategy.start(_FlowerLikeGrid(handlers, injector), initial, 2, timeout=1.0).arrays

    assert all(np.isfinite(a.numpy()).all() for a in final.values())
    assert any(not np.array_equal(final[k].numpy(), initial[k].numpy()) for k in initial.keys())  # healthy ones trained
    expected_reason = {"raise": "injected fault: raise", "vanish": "no reply within 1.0 s",
                       "wrong_shape": "rejected: wrong shape: ", "nan_values": "rejected: nan: "}
    for record in records:
        faults = {p: k for p, k in plan[record["round"]].items() if k}
        train_failures = {f["partition_id"]: f["reason"] for f in record["failures"] if f["phase"] == "train"}
        assert set(train_failures) == set(faults)
        for pid, kind in faults.items():
            assert expected_reason[kind] in train_failures[pid]
        assert record["train_devices"] == devices - len(faults)  # FedAvg averaged the healthy replies only


# --------------------------------------------------------------------------- the whole stack, each backend (slow)
#: seed 120, fraction 0.4, 6 devices (pinned below): round 1 = [raise, nan_values, timeout, ok, ok, wrong_shape],
#: round 2 = [ok, ok, wrong_shape, ok, wrong_shape, vanish]. One stalled device per round: the
#: simulation has 2 Ray actors (engine.num_cpus=1 on 2 cores) and a stalled device holds one.
E2E_PLAN = {
    1: ["raise", "nan_values", "timeout", None, None, "wrong_shape"],
    2: [None, None, "wrong_shape", None, "wrong_shape", "vanish"],
}
E2E = [
    "algorithm=fedavg", "seed=120", "rounds=2", "fleet.devices=6", "fleet.per_round=6", "fleet.availability_min=1.0",
    "dataset.proxy_samples=100", "dataset.global_test_samples=100", "dataset.partition.size_min=20",
    "dataset.partition.size_max=30", "dataset.partition.test_size=10", "pretrain.epochs=1", "model.width=8",
    "engine.num_cpus=1", "engine.round_timeout_s=10", "faults.fraction=0.4",
    "faults.kinds=[raise,timeout,vanish,wrong_shape,nan_values]",
]


#: Under Ray a vanishing device stalls its actor (experiments/fleet/faults.py); a worker process of the
#: process backend exits, and its message fails at once.
VANISH_REASON = {"ray": "no reply within 10.0 s", "processes": "exit code 75"}


@pytest.mark.parametrize("backend", ["ray", "processes"])
def test_every_fault_kind_on_each_backend_the_rounds_complete_with_the_rest(tmp_path, backend):
    for server_round, plan in E2E_PLAN.items():
        assert [fault_for(120, server_round, pid, 0.4, FAULT_KINDS) for pid in range(6)] == plan
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", *E2E, f"engine.backend={backend}",
           f"pretrain.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and len(results["rounds"]) == 2
    expected = {"raise": "injected fault: raise", "timeout": "no reply within 10.0 s", "vanish": VANISH_REASON[backend],
                "wrong_shape": "rejected: wrong shape: arrays/", "nan_values": "rejected: nan: arrays/"}
    for record in results["rounds"]:
        faults = {pid: kind for pid, kind in enumerate(E2E_PLAN[record["round"]]) if kind}
        reasons = {f["partition_id"]: f["reason"] for f in record["failures"] if f["phase"] == "train"}
        assert sorted(reasons) == sorted(faults)
        for pid, kind in faults.items():
            assert expected[kind] in reasons[pid], (kind, reasons[pid])
        assert record["train_devices"] == 6 - len(faults)  # the healthy replies were averaged
        assert math.isfinite(record["train_update_divergence"]) and math.isfinite(record["global_accuracy"])
    print(f"faulty run on {backend}: {elapsed:.1f} s")  # -s shows it; the watchdog ended the stalled devices
