"""ECLM's cloud (seed 001 sections 5.1-5.2): module-wise averaging, sub-model arrays, budgets, derive, profile.

Everything runs without Ray on hand-built ArrayRecords and Messages. Reply checks,
aggregation of replies and a full round are in ``tests/test_eclm_round.py``.
"""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from models.eclm.families import build_modular
from models.eclm.layer import module_of_key
from strategies.base import DeviceInfo
from strategies.eclm import ECLM, ModuleCatalog, device_budget, modulewise_average, submodel_arrays

torch.set_num_threads(1)

MLP = dict(num_classes=4, width=8, in_channels=3, modules_per_layer=4, shrink=0.5, k=2, image_size=8)
RESNET = dict(num_classes=4, width=4, in_channels=3, modules_per_layer=4, image_size=16)


def _record(**arrays):
    return ArrayRecord({k.replace("__", "."): Array(np.asarray(v)) for k, v in arrays.items()})


def _f32(*values):
    return np.array(values, dtype=np.float32)


# --------------------------------------------------------------------------- module-wise average (5.2)
CLOUD = _record(
    layers__0__modules__m0__w=_f32(0.0, 0.0),
    layers__0__modules__m1__w=_f32(0.0, 0.0),
    layers__0__modules__m2__w=_f32(0.1, 0.7),  # nobody holds m2
    head__w=_f32(0.0, 0.0),
    layers__0__active=np.array([True, True, True, False]),
)
DEVICE_A = _record(
    layers__0__modules__m0__w=_f32(1.0, 2.0),
    layers__0__modules__m1__w=_f32(3.0, 4.0),
    head__w=_f32(1.0, 1.0),
    layers__0__active=np.array([True, True, False, False]),  # per-device: must never be averaged
)
DEVICE_B = _record(layers__0__modules__m0__w=_f32(5.0, 10.0), head__w=_f32(5.0, 9.0))


def test_modulewise_average_against_hand_computed_numbers():
    out = modulewise_average(CLOUD, [(DEVICE_A, {"l0.m0": 0.6, "l0.m1": 0.2}, 10.0), (DEVICE_B, {"l0.m0": 0.2}, 30.0)])
    # m0: holders A and B, normalised importance 0.6/0.8 and 0.2/0.8:
    #     (0.6 * [1, 2] + 0.2 * [5, 10]) / 0.8 = [1.6, 3.2] / 0.8 = [2, 4]
    np.testing.assert_allclose(out["layers.0.modules.m0.w"].numpy(), [2.0, 4.0], rtol=1e-6)
    # m1: A is the only holder, its weight normalises to 1
    np.testing.assert_allclose(out["layers.0.modules.m1.w"].numpy(), [3.0, 4.0], rtol=1e-6)
    # head (shared): by examples, (10 * [1, 1] + 30 * [5, 9]) / 40 = [4, 7]
    np.testing.assert_allclose(out["head.w"].numpy(), [4.0, 7.0], rtol=1e-6)
    # m2 nobody held, active is the cloud's own: both bit-identical
    assert out["layers.0.modules.m2.w"].numpy().tobytes() == CLOUD["layers.0.modules.m2.w"].numpy().tobytes()
    assert out["layers.0.active"].numpy().tolist() == [True, True, True, False]
    assert out["head.w"].numpy().dtype == np.float32
    assert list(out.keys()) == list(CLOUD.keys())


def test_modulewise_average_zero_importance_falls_back_to_plain_mean():
    out = modulewise_average(CLOUD, [(DEVICE_A, {"l0.m0": 0.0}, 10.0), (DEVICE_B, {"l0.m0": 0.0}, 30.0)])
    # (1/2) * ([1, 2] + [5, 10]) = [3, 6]; not the example-weighted [4, 8]
    np.testing.assert_allclose(out["layers.0.modules.m0.w"].numpy(), [3.0, 6.0], rtol=1e-6)
    # a holder that did not report (or reported zero for) a module gets no say when another did
    out = modulewise_average(CLOUD, [(DEVICE_A, {"l0.m0": 0.5}, 10.0), (DEVICE_B, {}, 30.0)])
    np.testing.assert_allclose(out["layers.0.modules.m0.w"].numpy(), [1.0, 2.0], rtol=1e-6)


def test_modulewise_average_without_updates_is_the_cloud():
    out = modulewise_average(CLOUD, [])
    assert all(out[k].numpy().tobytes() == CLOUD[k].numpy().tobytes() for k in CLOUD.keys())


# --------------------------------------------------------------------------- sub-model messages
@pytest.mark.parametrize(
    "family, kwargs, ids, masks",
    [
        ("modular_mlp", MLP, ("l0.m0", "l0.m3"), [[1, 0, 0, 1]]),
        (
            "modular_resnet18", RESNET, ("l0.m1", "l1.m0", "l1.m2", "l2.m3", "l3.m0", "l3.m1", "l3.m2"),
            [[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]],
        ),
    ],
)
def test_submodel_arrays_load_strictly_into_the_extracted_skeleton(family, kwargs, ids, masks):
    cloud = build_modular(family, **kwargs)
    full = ArrayRecord(cloud.state_dict())
    sub = submodel_arrays(full, ids, cloud.layer_sizes())
    # exactly the shared keys plus the chosen modules' keys
    expected = {k for k in full.keys() if module_of_key(k) is None or module_of_key(k) in ids}
    assert set(sub.keys()) == expected
    for key in expected - {k for k in expected if k.endswith(".active")}:
        assert sub[key].numpy().tobytes() == full[key].numpy().tobytes()
    # active masks: exactly the chosen indices per layer
    for layer, expected_mask in enumerate(masks):
        mask = sub[f"layers.{layer}.active"].numpy()
        assert mask.dtype == np.bool_ and mask.astype(int).tolist() == expected_mask
    # the real contract: a device rebuilds extract(ids) and loads strictly
    device_model = build_modular(family, **kwargs).extract(ids)
    device_model.load_state_dict(sub.to_torch_state_dict(), strict=True)
    for key, value in device_model.state_dict().items():
        assert torch.equal(value, cloud.state_dict()[key]) or key.endswith(".active")


def test_submodel_arrays_do_not_fit_another_sub_model():
    cloud = build_modular("modular_mlp", **MLP)
    sub = submodel_arrays(ArrayRecord(cloud.state_dict()), ("l0.m0",), cloud.layer_sizes())
    with pytest.raises(RuntimeError):
        cloud.extract(("l0.m1",)).load_state_dict(sub.to_torch_state_dict(), strict=True)


# --------------------------------------------------------------------------- device budget (5.1)
def test_device_budget_by_hand():
    budget = {"uplink_bps": 1e6, "downlink_bps": 4e6, "flops_per_s": 2e9, "memory_bytes": 5e8, "device_class": "x"}
    got = device_budget(budget, samples=100, epochs=2, round_budget_s=10.0, size_cap_bytes=1e9)
    # comm: 10 / (1/1e6 + 1/4e6) = 10 / 1.25e-6 = 8e6 bytes; comp: 10 * 2e9 / (100 * 2) = 1e8; mem 5e8
    np.testing.assert_allclose(got, [8e6, 1e8, 5e8])
    capped = device_budget(budget, samples=100, epochs=2, round_budget_s=10.0, size_cap_bytes=5e6)
    assert capped[0] == 5e6
    # epochs 0 counts as one pass, an empty device as one sample (no division by zero)
    assert device_budget(budget, 100, 0, 10.0, 1e9)[1] == pytest.approx(2e8)
    assert device_budget(budget, 0, 2, 10.0, 1e9)[1] == pytest.approx(2e10)
    # budgets reported through a ConfigRecord may arrive as strings of numbers
    as_text = {k: str(v) for k, v in budget.items()}
    np.testing.assert_allclose(device_budget(as_text, 100, 2, 10.0, 1e9), got)


# --------------------------------------------------------------------------- derive (knapsack)
# Hand-made catalog: 3 modules in layer 0, 2 in layer 1. shared: 1000 B, 100 FLOPs, 10000 B memory.
HAND_CATALOG = ModuleCatalog(
    layer_of={"l0.m0": 0, "l0.m1": 0, "l0.m2": 0, "l1.m0": 1, "l1.m1": 1},
    costs={m: (100.0, 10.0, 100.0) for m in ("l0.m0", "l0.m1", "l0.m2", "l1.m0", "l1.m1")},
    shared_cost=(1000.0, 100.0, 10000.0),
)
HAND_IMPORTANCE = {"l0.m0": 0.1, "l0.m1": 0.6, "l0.m2": 0.3, "l1.m0": 0.8, "l1.m1": 0.2}


def _rich(memory):
    return {"uplink_bps": 1e12, "downlink_bps": 1e12, "flops_per_s": 1e12, "memory_bytes": memory}


def _hand_strategy(size_cap=1.0, **kwargs):
    strategy = ECLM(
        catalog=HAND_CATALOG, layer_sizes=(3, 2), samples_per_device=10, epochs=1, round_budget_s=10.0,
        size_cap=size_cap, per_round=4, seed=0, expected_devices=4, **kwargs,
    )
    return strategy


def test_catalog_total_bytes():
    assert HAND_CATALOG.total_bytes == 1000.0 + 5 * 100.0


def test_derive_by_memory_budget_and_skip_when_forced_set_does_not_fit():
    strategy = _hand_strategy()
    # forced: l0.m1 (0.6) and l1.m0 (0.8): 10000 + 2 * 100 = 10200 bytes of memory
    memories = {0: 10100.0, 1: 10200.0, 2: 10300.0, 3: 10400.0, 4: 1e9}
    for pid, memory in memories.items():
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 10, _rich(memory))
        strategy.importance[pid] = dict(HAND_IMPORTANCE)
    assert strategy.derive(0) is None
    failure = strategy.ledger.failures[-1]
    assert failure["partition_id"] == 0 and failure["phase"] == "derive" and "mem" in failure["reason"]
    assert strategy.derive(1) == ("l0.m1", "l1.m0")
    assert strategy.derive(2) == ("l0.m1", "l0.m2", "l1.m0")  # next most important: l0.m2 (0.3)
    assert strategy.derive(3) == ("l0.m1", "l0.m2", "l1.m0", "l1.m1")  # then l1.m1 (0.2)
    assert strategy.derive(4) == ("l0.m0", "l0.m1", "l0.m2", "l1.m0", "l1.m1")
    assert len(strategy.ledger.failures) == 1


def test_derive_is_monotone_in_the_budget():
    strategy = _hand_strategy()
    counts, previous = [], set()
    for pid, memory in enumerate(np.linspace(10200.0, 10600.0, 9)):
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 10, _rich(float(memory)))
        strategy.importance[pid] = dict(HAND_IMPORTANCE)
        ids = set(strategy.derive(pid))
        assert previous <= ids  # a richer device keeps everything a poorer one got (distinct costs aside)
        counts.append(len(ids))
        previous = ids
    assert counts[0] == 2 and counts[-1] == 5 and counts == sorted(counts)


def test_derive_respects_the_size_cap_and_the_compute_budget():
    # size cap 0.8 of 1500 bytes = 1200 bytes = shared + the two forced modules
    strategy = _hand_strategy(size_cap=0.8)
    strategy.devices[0] = DeviceInfo(0, 100, 10, _rich(1e9))
    strategy.importance[0] = dict(HAND_IMPORTANCE)
    assert strategy.derive(0) == ("l0.m1", "l1.m0")
    # compute: 10 s * 13 FLOP/s / (10 samples * 1 epoch) = 13 FLOPs per sample < 100 of the shared part
    slow = _hand_strategy()
    slow.devices[0] = DeviceInfo(0, 100, 10, {**_rich(1e9), "flops_per_s": 13.0})
    slow.importance[0] = dict(HAND_IMPORTANCE)
    assert slow.derive(0) is None and "comp" in slow.ledger.failures[-1]["reason"]
    # 10 s * 131 / 10 = 131 FLOPs = 100 shared + 3 modules of 10
    slow.devices[0] = DeviceInfo(0, 100, 10, {**_rich(1e9), "flops_per_s": 131.0})
    assert slow.derive(0) == ("l0.m1", "l0.m2", "l1.m0")
    # num_examples 0 (unknown) falls back to samples_per_device (10)
    slow.devices[0] = DeviceInfo(0, 100, 0, {**_rich(1e9), "flops_per_s": 131.0})
    assert slow.derive(0) == ("l0.m1", "l0.m2", "l1.m0")


class _ScriptedGrid:
    """Answers each message with ``answer(partition_id, message)``."""

    def __init__(self, strategy, answer):
        self.strategy, self.answer = strategy, answer

    def send_and_receive(self, messages, timeout=None):
        return [self.answer(self.strategy._by_node[m.metadata.dst_node_id], m) for m in messages]


def test_profile_keeps_only_devices_with_one_finite_importance_per_module():
    strategy = _hand_strategy()
    for pid in range(4):
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 10, _rich(1e9))
        strategy._by_node[100 + pid] = pid
    reported = {
        0: dict(HAND_IMPORTANCE),
        1: {k: v for k, v in HAND_IMPORTANCE.items() if k != "l1.m1"},  # one module missing
        2: {**HAND_IMPORTANCE, "l0.m0": float("nan")},
        3: {**HAND_IMPORTANCE, "l1.m0": -0.5},
    }

    def answer(pid, msg):
        assert set(msg.content["selector"].keys()) == {"selector.w"}  # only the selector travels
        content = RecordDict({"metrics": MetricRecord({"num-examples": 10}),
                              "importance": MetricRecord(reported[pid])})
        return Message(content, reply_to=msg)

    cloud = _record(selector__w=_f32(1.0), head__w=_f32(2.0))
    assert strategy.profile(_ScriptedGrid(strategy, answer), 1, cloud) == [0]
    assert strategy.importance == {0: HAND_IMPORTANCE}
    failed = {f["partition_id"]: f for f in strategy.ledger.failures}
    assert sorted(failed) == [1, 2, 3] and all(f["phase"] == "profile" for f in failed.values())
    assert "not one value per module" in failed[1]["reason"]
    assert "l0.m0" in failed[2]["reason"] and "l1.m0" in failed[3]["reason"]
    assert strategy.ledger.completed == {0}
