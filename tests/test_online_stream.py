"""The online test-time stream (CEMA setting): FederatedData.stream_batch on the digits."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from experiments.config import from_dict, scenario_named
from experiments.data import CLEAN, FederatedData, StreamBatch
from experiments.data.online import TAG_BATCH, batch_domain, batch_originals, device_domains
from experiments.schema import ConfigError, DatasetConfig

#: ECLM 7.2's scenario (conf/scenario/one_step.yaml): clean edge data unless corruptions are
#: named, every device in the same order (the default scenario mixes corruptions per device)
OneStep = functools.partial(scenario_named, "one_step")

SMALL = DatasetConfig(proxy_samples=200, global_test_samples=100)
CORRUPTIONS = ("gaussian_noise", "fog", "brightness", "contrast")
ONLINE = OneStep(corruptions=CORRUPTIONS, batches_per_domain=2, stream_batch=16)
PER_DEVICE = dataclasses.replace(ONLINE, per_device_domains=True)


@pytest.fixture(scope="module")
def fleet():
    return FederatedData(SMALL, ONLINE, num_devices=20, seed=0)


@pytest.fixture(scope="module")
def per_device_fleet():
    return FederatedData(SMALL, PER_DEVICE, num_devices=20, seed=0)


def test_batch_is_a_uint8_nhwc_record_of_stream_batch_samples(fleet):
    batch = fleet.stream_batch(3, 0)
    assert isinstance(batch, StreamBatch)
    assert batch.x.shape == (16, 32, 32, 3) and batch.x.dtype == np.uint8
    assert batch.y.shape == (16,) and batch.y.dtype == np.int64
    assert batch.index == 0 and batch.domain == "gaussian_noise"


def test_default_batch_is_cema_64():
    data = FederatedData(SMALL, OneStep(), num_devices=10, seed=0)
    batch = data.stream_batch(0, 0)
    assert batch.x.shape == (64, 32, 32, 3) and batch.domain == CLEAN
    assert data.device_domains(0) == (CLEAN,)


def test_same_arguments_give_the_same_batch_from_a_fresh_build():
    a = FederatedData(SMALL, ONLINE, 20, seed=4).stream_batch(6, 5)
    b = FederatedData(SMALL, ONLINE, 20, seed=4).stream_batch(6, 5)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and a.domain == b.domain
    c = FederatedData(SMALL, ONLINE, 20, seed=5).stream_batch(6, 5)
    assert not np.array_equal(a.x, c.x)


def test_other_index_gives_other_samples(fleet):
    first, second = fleet.stream_batch(2, 0), fleet.stream_batch(2, 1)  # both gaussian_noise
    assert first.domain == second.domain
    assert not np.array_equal(first.x, second.x)
    originals = fleet.device_originals(2)
    picks_0 = batch_originals(originals, 16, (0, TAG_BATCH, 2), 0)
    picks_1 = batch_originals(originals, 16, (0, TAG_BATCH, 2), 1)
    assert np.array_equal(picks_0, first.originals) and np.array_equal(picks_1, second.originals)
    assert not set(picks_0.tolist()) & set(picks_1.tolist())  # a pair shares no original
    assert len(np.unique(picks_0)) == 16  # half the device's originals (>= 16) gives distinct ones


def test_domain_switches_exactly_every_batches_per_domain_batches(fleet):
    sequence = ("a", "b", "c")
    assert [batch_domain(sequence, i, 2) for i in range(8)] == list("aabbccaa")
    assert [batch_domain(sequence, i, 1) for i in range(4)] == list("abca")
    # 4 corruptions, 2 batches each: batch i is in CORRUPTIONS[(i // 2) % 4]
    expected = {0: "gaussian_noise", 1: "gaussian_noise", 2: "fog", 3: "fog",
                7: "contrast", 8: "gaussian_noise", 13: "brightness"}
    for index, domain in expected.items():
        assert fleet.stream_batch(4, index).domain == domain


def test_shared_order_when_per_device_domains_is_off(fleet):
    assert {fleet.device_domains(k) for k in range(20)} == {CORRUPTIONS}


def test_per_device_orders_are_seeded_permutations_that_differ(per_device_fleet):
    orders = [per_device_fleet.device_domains(k) for k in range(20)]
    assert all(sorted(order) == sorted(CORRUPTIONS) for order in orders)
    assert len(set(orders)) >= 5  # 24 possible orders over 20 devices
    assert orders == [device_domains(PER_DEVICE, 0, k) for k in range(20)]
    assert orders != [device_domains(PER_DEVICE, 1, k) for k in range(20)]
    k = next(k for k, order in enumerate(orders) if order != CORRUPTIONS)
    assert per_device_fleet.stream_batch(k, 0).domain == orders[k][0]
    assert per_device_fleet.stream_batch(k, 2).domain == orders[k][1]


def test_labels_come_from_the_devices_own_classes(fleet):
    for k in (0, 7, 19):
        classes = set(fleet.pool_labels[fleet.partitions[k]].tolist())
        assert len(classes) == 2  # label skew, m = 2
        labels = set()
        for index in range(3):
            labels |= set(fleet.stream_batch(k, index).y.tolist())
        assert labels == classes  # 48 draws from a 2-class partition hit both classes


def test_corruption_changes_pixels_not_samples():
    clean = FederatedData(SMALL, OneStep(stream_batch=16), 10, seed=0).stream_batch(1, 3)
    faded = OneStep(corruptions=("contrast",), severity=5, stream_batch=16)
    shifted = FederatedData(SMALL, faded, 10, seed=0).stream_batch(1, 3)
    assert np.array_equal(clean.y, shifted.y) and shifted.domain == "contrast"
    assert shifted.x.astype(float).std() < 0.5 * clean.x.astype(float).std()


def test_batch_larger_than_half_the_partition_repeats_its_half():
    big = OneStep(stream_batch=400)  # a partition of 20 devices holds ~150 rows (~40 distinct originals)
    data = FederatedData(SMALL, big, 20, seed=0)
    first, second = data.stream_batch(0, 0), data.stream_batch(0, 1)
    assert first.x.shape == (400, 32, 32, 3)
    assert not set(first.originals.tolist()) & set(second.originals.tolist())
    held = len(data.device_originals(0))
    assert len(np.unique(first.originals)) + len(np.unique(second.originals)) == held  # the halves cover all


def test_stream_settings_leave_slot_data_unchanged():
    # (per_device_domains does change it: each device then holds its own domain, tests/test_federated.py)
    slot_data = FederatedData(SMALL, ONLINE, 20, seed=0).device(3, slot=1)
    other = dataclasses.replace(ONLINE, stream_batch=8, batches_per_domain=5)
    same = FederatedData(SMALL, other, 20, seed=0).device(3, slot=1)
    assert np.array_equal(slot_data.train_x, same.train_x) and slot_data.domain == same.domain


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ({"stream_batch": 0}, "scenario.stream_batch must be >= 1, got 0"),
        ({"batches_per_domain": 0}, "scenario.batches_per_domain must be >= 1, got 0"),
        ({"stream_batch": 1.5}, "scenario.stream_batch must be an integer"),
        ({"per_device_domains": "maybe"}, "scenario.per_device_domains must be true or false"),
    ],
)
def test_bad_stream_settings_fail_config_validation(scenario, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"scenario": scenario})


@pytest.mark.parametrize("key", ["stream_batch", "batches_per_domain"])
def test_data_room_rejects_bad_stream_settings(key):
    with pytest.raises(ConfigError, match=f"scenario.{key}=-1 must be an integer >= 1"):
        FederatedData(SMALL, OneStep(**{key: -1}), 10, seed=0)


def test_bad_stream_requests(fleet):
    for bad in (-1, 20, "3", True):
        with pytest.raises(ValueError, match="partition_id=.* is out of range"):
            fleet.stream_batch(bad, 0)
    with pytest.raises(ValueError, match="partition_id=20 is out of range"):
        fleet.device_domains(20)
    for bad in (-1, 2.0, "1"):
        with pytest.raises(ValueError, match="index=.* must be an integer >= 0"):
            fleet.stream_batch(0, bad)
    assert fleet.stream_batch(np.int64(1), np.int64(2)).index == 2
