"""FederatedData on the embedded digits: parts, devices, streams, domains, errors."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from experiments.config import scenario_named
from experiments.data import CLEAN, FederatedData, build_federated_data, slot_domain, to_tensor
from experiments.data.partition import split_originals, tuning_reserve
from experiments.data.stream import replaced_count
from experiments.schema import DatasetConfig, PartitionConfig

#: ECLM 7.2's scenario (conf/scenario/one_step.yaml): clean edge data unless corruptions are
#: named, every device in the same order (the default scenario mixes corruptions per device)
OneStep = functools.partial(scenario_named, "one_step")

torch.set_num_threads(1)
SMALL = DatasetConfig(proxy_samples=200, global_test_samples=100)
STREAM = OneStep(replace_fraction=0.2, corruptions=("gaussian_noise", "fog", "brightness"))


@pytest.fixture(scope="module")
def fleet():
    return FederatedData(SMALL, STREAM, num_devices=100, seed=0)


def test_build_is_cached_per_process():
    a = build_federated_data(SMALL, OneStep(), 10, 0)
    assert build_federated_data(SMALL, OneStep(), 10, 0) is a
    assert build_federated_data(SMALL, OneStep(), 10, 1) is not a
    assert a.num_classes == 10 and a.image_shape == (3, 32, 32)


def test_parts_are_disjoint_and_devices_use_their_own(fleet):
    split = fleet.split
    test, proxy, edge, tune = (set(p.tolist()) for p in (split.test, split.proxy, split.edge, split.tune))
    assert not (test & proxy or test & edge or proxy & edge or tune & (test | proxy | edge))
    assert len(test | proxy | edge | tune) == 1797
    for k in (0, 41, 99):
        plan, tests = fleet.device_plan(k, slot=3)
        assert set(fleet.pool_originals[plan.rows].tolist()) <= edge
        assert set(tests.tolist()) <= test


def test_sizes_summary(fleet):
    sizes = fleet.sizes()
    # 1797 originals: 20 % per class to test (359), 30 % of the rest to proxy (434); of the other
    # 1004, those in the tuning reserve (20 % of every class, a fixed seed) form the tuning part
    originals = sizes["originals"]
    assert {k: originals[k] for k in ("total", "test", "proxy")} == {"total": 1797, "test": 359, "proxy": 434}
    assert originals["edge"] + originals["tune"] == 1004
    labels = fleet.source.labels
    whole_edge = split_originals(labels, 0.2, 0.3, seed=0, tune_fraction=0.0).edge
    assert np.array_equal(fleet.split.tune, np.intersect1d(whole_edge, tuning_reserve(labels)))
    assert sizes["pool_rows"] == 100 * 150
    assert sizes["domains"] == ["gaussian_noise", "fog", "brightness"]


def test_every_device_holds_exactly_m_classes_and_a_size_in_range(fleet):
    sizes = []
    for k in range(100):
        plan, _ = fleet.device_plan(k, slot=2)
        assert len(np.unique(fleet.pool_labels[plan.rows])) == 2
        sizes.append(len(plan.rows))
    assert min(sizes) >= 50 and max(sizes) <= 150 and len(set(sizes)) > 30


def test_device_arrays(fleet):
    data = fleet.device(5)
    n = len(data.train_y)
    assert data.train_x.shape == (n, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.train_y.dtype == np.int64 and data.test_y.dtype == np.int64
    assert data.test_x.shape == (30, 32, 32, 3)
    assert set(data.test_y.tolist()) == set(data.train_y.tolist())
    # test labels follow the training mix: allocate(30, counts) within one sample
    train_share = np.bincount(data.train_y, minlength=10) / n
    assert np.abs(np.bincount(data.test_y, minlength=10) - 30 * train_share).max() <= 1


def test_slot_replaces_exactly_round_f_n_and_keeps_the_rest(fleet):
    for k in (3, 17):
        for t in (1, 2, 5):
            before, _ = fleet.device_plan(k, t - 1)
            after, _ = fleet.device_plan(k, t)
            changed = before.draws != after.draws
            assert changed.sum() == replaced_count(0.2, len(before.rows))
            assert np.array_equal(before.rows[~changed], after.rows[~changed])
            assert (after.slots[changed] == t).all()
            # replacements keep the label of the position they replace
            assert np.array_equal(fleet.pool_labels[before.rows], fleet.pool_labels[after.rows])
    assert replaced_count(0.2, 62) == 12 and replaced_count(0.5, 75) == 38


def test_replacements_are_rows_the_device_did_not_hold(fleet):
    checked = 0
    for k in range(20):
        before, _ = fleet.device_plan(k, 0)
        after, _ = fleet.device_plan(k, 1)
        if len(before.rows) <= 80:  # its partition (>= 140 rows) has enough unheld rows
            changed = before.draws != after.draws
            assert not set(after.rows[changed].tolist()) & set(before.rows.tolist())
            checked += 1
    assert checked >= 3


def test_kept_samples_stay_pixel_identical_and_new_ones_carry_their_domain(fleet):
    plan0, _ = fleet.device_plan(8, 0)
    plan1, _ = fleet.device_plan(8, 1)
    kept = plan0.draws == plan1.draws
    slot0, slot1 = fleet.device(8, 0), fleet.device(8, 1)
    assert slot0.domain == "gaussian_noise" and slot1.domain == "fog"
    assert np.array_equal(slot0.train_x[kept], slot1.train_x[kept])
    assert not np.array_equal(slot0.train_x[~kept], slot1.train_x[~kept])
    # same test originals, re-rendered in each slot's domain
    assert np.array_equal(slot0.test_y, slot1.test_y)
    assert not np.array_equal(slot0.test_x, slot1.test_x)


def test_domains_cycle():
    assert [slot_domain(STREAM, t) for t in range(5)] == [
        "gaussian_noise", "fog", "brightness", "gaussian_noise", "fog",
    ]
    assert slot_domain(OneStep(), 7) == CLEAN


def test_corruption_changes_pixels_but_not_labels():
    clean = FederatedData(SMALL, OneStep(), 10, seed=0).device(2)
    contrast = OneStep(corruptions=("contrast",), severity=5)
    noisy = FederatedData(SMALL, contrast, 10, seed=0).device(2)
    assert clean.domain == CLEAN and noisy.domain == "contrast"
    assert np.array_equal(clean.train_y, noisy.train_y)
    # contrast at severity 5 squeezes pixels towards the mean: a smaller spread
    assert noisy.train_x.astype(float).std() < 0.5 * clean.train_x.astype(float).std()


def test_same_config_same_arrays_other_seed_other_arrays():
    a = FederatedData(SMALL, STREAM, 20, seed=4).device(6, slot=2)
    b = FederatedData(SMALL, STREAM, 20, seed=4).device(6, slot=2)
    c = FederatedData(SMALL, STREAM, 20, seed=5).device(6, slot=2)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.train_x[: len(c.train_x)], c.train_x[: len(a.train_x)])


def test_device_returns_copies(fleet):
    first = fleet.device(1)
    first.train_x[:] = 0
    assert fleet.device(1).train_x.any()


def test_proxy_and_global_test(fleet):
    x, y = fleet.proxy()
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y, minlength=10).min() >= 15  # proxy originals are stratified
    tx, ty = fleet.global_test()
    assert tx.shape == (100, 32, 32, 3) and len(ty) == 100
    shifted, shifted_y = fleet.global_test(slot=1)  # fog
    assert np.array_equal(ty, shifted_y) and not np.array_equal(tx, shifted)
    again, _ = fleet.global_test()
    assert np.array_equal(tx, again)


def test_iid_and_dirichlet_fleets_build():
    for partition in (PartitionConfig(kind="iid"), PartitionConfig(kind="dirichlet", alpha=0.3)):
        dataset = dataclasses.replace(SMALL, partition=partition)
        fleet = FederatedData(dataset, OneStep(), 30, seed=0)
        data = fleet.device(29)
        assert 50 <= len(data.train_y) <= 150 and set(data.test_y) <= set(data.train_y)


def test_to_tensor_by_hand():
    x = np.array([0, 255, 51], dtype=np.uint8).reshape(1, 1, 1, 3)
    t = to_tensor(x)
    assert t.shape == (1, 3, 1, 1) and t.dtype == torch.float32
    assert t.flatten().tolist() == pytest.approx([-1.0, 1.0, -0.6])
    with pytest.raises(ValueError, match="uint8 images of shape"):
        to_tensor(np.zeros((2, 32, 32, 3), dtype=np.float32))


@pytest.mark.parametrize(
    ("dataset", "scenario", "message"),
    [
        (DatasetConfig(name="mnist"), OneStep(), "dataset.name='mnist' is unknown"),
        (DatasetConfig(partition=PartitionConfig(classes_per_device=11)), OneStep(),
         "classes_per_device=11 exceeds the 10 classes"),
        (DatasetConfig(partition=PartitionConfig(size_min=90, size_max=80)), OneStep(),
         "size_min=90 exceeds size_max=80"),
        (DatasetConfig(test_fraction=0.0), OneStep(), "test_fraction=0.0 must lie"),
        (DatasetConfig(proxy_fraction=1.0), OneStep(), "proxy_fraction=1.0 must lie"),
        (DatasetConfig(partition=PartitionConfig(kind="dirichlet", alpha=0.0)), OneStep(),
         "alpha=0.0 must be > 0"),
        (DatasetConfig(partition=PartitionConfig(kind="shards")), OneStep(),
         "kind='shards' is unknown"),
        (SMALL, OneStep(corruptions=("rain",)), "unknown corruption 'rain'"),
        (SMALL, OneStep(corruptions=("fog",), severity=6), "severity=6 must be one of"),
        (SMALL, OneStep(replace_fraction=1.5), "replace_fraction=1.5 must lie"),
    ],
)
def test_bad_config_is_one_clear_value_error(dataset, scenario, message):
    with pytest.raises(ValueError, match=message):
        FederatedData(dataset, scenario, 10, seed=0)


def test_bad_device_requests(fleet):
    for bad in (-1, 100, "3", 2.0, True):
        with pytest.raises(ValueError, match="partition_id=.* is out of range"):
            fleet.device(bad)
    with pytest.raises(ValueError, match="slot=-1 must be an integer >= 0"):
        fleet.device(0, slot=-1)
    assert fleet.device(np.int64(4)).train_x.shape[1:] == (32, 32, 3)
    with pytest.raises(ValueError, match="number of devices"):
        FederatedData(SMALL, OneStep(), 0, seed=0)
    with pytest.raises(ValueError, match="seed=-1 must be an integer >= 0"):
        FederatedData(SMALL, OneStep(), 10, seed=-1)


def test_train_and_test_parts_equal_the_device_and_render_alone():
    fresh = FederatedData(SMALL, STREAM, num_devices=100, seed=0)
    test_x, test_y, domain = fresh.device_test(7, slot=2)
    assert [key[0] for key in fresh._devices] == ["test"]  # only the local test set was rendered
    train_x, train_y = fresh.device_train(7, slot=2)
    whole = FederatedData(SMALL, STREAM, num_devices=100, seed=0).device(7, slot=2)
    for part, full in ((train_x, whole.train_x), (train_y, whole.train_y), (test_x, whole.test_x), (test_y, whole.test_y)):
        np.testing.assert_array_equal(part, full)
    assert domain == whole.domain == slot_domain(STREAM, 2)
    train_x[:] = 0  # callers get copies
    assert fresh.device_train(7, slot=2)[0].any()


def test_device_parts_render_a_part_only_when_read():
    from experiments.client_app import DeviceParts
    from experiments.schema import RunConfig

    cfg = dataclasses.replace(RunConfig(), dataset=SMALL, scenario=STREAM)
    parts = DeviceParts(cfg, 3, 1)
    shared = build_federated_data(SMALL, STREAM, cfg.fleet.devices, cfg.seed)
    expected_x, expected_y, _ = shared.device_test(3, 1)
    assert torch.equal(parts.test_y, torch.as_tensor(expected_y)) and torch.equal(parts.test_x, to_tensor(expected_x))
    assert ("train", 3, 1) not in shared._devices  # evaluation did not render the training set
    assert torch.equal(parts.train_y, torch.as_tensor(shared.device_train(3, 1)[1]))


def test_per_device_domains_give_each_device_its_own_order_of_the_corruptions():
    mix = OneStep(corruptions=("gaussian_noise", "fog", "brightness"), per_device_domains=True)
    data = FederatedData(SMALL, mix, num_devices=20, seed=0)
    from experiments.data import online

    for k in (0, 7, 13):
        order = online.device_domains(mix, 0, k)
        assert sorted(order) == sorted(mix.corruptions)
        assert [data.slot_domain(k, t) for t in range(4)] == [order[0], order[1], order[2], order[0]]
        assert data.device_test(k, slot=1)[2] == order[1]
    assert len({data.slot_domain(k, 0) for k in range(20)}) == 3  # the fleet holds a mix at slot 0
    shared = FederatedData(SMALL, dataclasses.replace(mix, per_device_domains=False), num_devices=20, seed=0)
    assert {shared.slot_domain(k, 1) for k in range(20)} == {"fog"}  # without it: the slot's domain for all


def test_a_device_renders_its_own_domain_in_the_mix():
    mix = OneStep(corruptions=("gaussian_noise", "brightness"), per_device_domains=True)
    data = FederatedData(SMALL, mix, num_devices=20, seed=0)
    clean = FederatedData(SMALL, OneStep(), num_devices=20, seed=0)
    k = next(k for k in range(20) if data.slot_domain(k, 0) == "gaussian_noise")
    noisy_x, noisy_y, domain = data.device_test(k)
    clean_x, clean_y, _ = clean.device_test(k)
    assert domain == "gaussian_noise" and np.array_equal(noisy_y, clean_y)  # same samples, labels kept
    assert not np.array_equal(noisy_x, clean_x)
