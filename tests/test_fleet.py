"""Tests for experiments/fleet/budgets.py: device table, seeded budgets, fluctuation, virtual clock."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments.fleet.budgets import (
    DEVICE_CLASSES,
    GIB,
    DeviceBudget,
    DeviceClass,
    class_probabilities,
    is_available,
    load_factor,
    sample_budget,
)
from experiments.schema import FleetConfig

PIDS = range(400)


def _budget(**overrides) -> DeviceBudget:
    values = dict(
        device_class="jetson_nano_4gb",
        memory_bytes=1e9,
        flops_per_s=1e9,
        uplink_bps=5e5,
        downlink_bps=1e6,
        availability=0.9,
    )
    values.update(overrides)
    return DeviceBudget(**values)


# --------------------------------------------------------------------------- device table
def test_table_has_the_expected_classes():
    assert 6 <= len(DEVICE_CLASSES) <= 8
    assert {"raspberry_pi_4b_2gb", "jetson_nano_4gb", "jetson_xavier_nx_8gb", "phone_8gb"} <= set(DEVICE_CLASSES)
    assert DEVICE_CLASSES["raspberry_pi_4b_2gb"].ram_bytes == 2 * GIB


@pytest.mark.parametrize("device", DEVICE_CLASSES.values(), ids=list(DEVICE_CLASSES))
def test_every_class_has_positive_ordered_ranges_and_sources(device: DeviceClass):
    assert device.ram_bytes > 0
    for key in ("train_memory_fraction", "flops_per_s", "uplink_bps", "downlink_bps"):
        low, high = getattr(device, key)
        assert 0 < low <= high, key
    assert device.train_memory_fraction[1] <= 1
    assert device.sources and all(isinstance(s, str) and s for s in device.sources)


def test_table_orders_devices_as_published_figures_do():
    # Xavier NX (845 GFLOPS fp32 peak) > Nano (236) > Pi 4B (48); flagship phone > entry phone
    speed = {name: c.flops_per_s[1] for name, c in DEVICE_CLASSES.items()}
    assert speed["jetson_xavier_nx_8gb"] > speed["jetson_nano_4gb"] > speed["raspberry_pi_4b_4gb"]
    assert speed["phone_8gb"] > speed["phone_6gb"] > speed["phone_4gb"] > speed["phone_3gb"]
    # Pi 4B: 4 cores x 1.5 GHz x 8 FLOP/cycle = 48 GFLOP/s peak; high end of range = 20 % of it
    assert DEVICE_CLASSES["raspberry_pi_4b_2gb"].flops_per_s[1] == pytest.approx(0.2 * 48e9)


def test_device_class_rejects_reversed_range():
    good = DEVICE_CLASSES["phone_4gb"]
    with pytest.raises(ValueError, match="flops_per_s"):
        dataclasses.replace(good, flops_per_s=(2e9, 1e9))
    with pytest.raises(ValueError, match="source"):
        dataclasses.replace(good, sources=())


# --------------------------------------------------------------------------- sampling
def test_sampled_budgets_fall_inside_their_class_ranges():
    cfg = FleetConfig(availability_min=0.6, availability_max=0.8)
    for pid in PIDS:
        budget = sample_budget(cfg, seed=7, partition_id=pid)
        device = DEVICE_CLASSES[budget.device_class]
        low, high = device.train_memory_fraction
        assert low * device.ram_bytes <= budget.memory_bytes <= high * device.ram_bytes
        assert device.flops_per_s[0] <= budget.flops_per_s <= device.flops_per_s[1]
        assert device.uplink_bps[0] <= budget.uplink_bps <= device.uplink_bps[1]
        assert device.downlink_bps[0] <= budget.downlink_bps <= device.downlink_bps[1]
        assert 0.6 <= budget.availability <= 0.8


def test_same_seed_and_partition_give_identical_budget():
    cfg = FleetConfig()
    assert sample_budget(cfg, 3, 11) == sample_budget(cfg, 3, 11)
    assert sample_budget(cfg, 3, 11) != sample_budget(cfg, 3, 12)
    assert sample_budget(cfg, 3, 11) != sample_budget(cfg, 4, 11)


def test_budget_does_not_depend_on_fleet_size_or_draw_order():
    small, large = FleetConfig(devices=10, per_round=2), FleetConfig(devices=10_000, per_round=500)
    first = sample_budget(small, 0, 5)
    for pid in range(20):  # other devices drawn in between change nothing
        sample_budget(large, 0, pid)
    assert sample_budget(large, 0, 5) == first


def test_empty_mix_is_uniform_and_draws_every_class():
    probabilities = class_probabilities({})
    np.testing.assert_allclose(probabilities, np.full(len(DEVICE_CLASSES), 1 / len(DEVICE_CLASSES)))
    drawn = {sample_budget(FleetConfig(), 0, pid).device_class for pid in PIDS}
    assert drawn == set(DEVICE_CLASSES)


def test_single_class_mix_always_draws_that_class():
    cfg = FleetConfig(mix={"jetson_nano_4gb": 1.0})
    assert {sample_budget(cfg, 1, pid).device_class for pid in PIDS} == {"jetson_nano_4gb"}


def test_zero_weight_class_is_never_drawn_and_weights_are_respected():
    cfg = FleetConfig(mix={"phone_3gb": 3.0, "phone_8gb": 1.0, "raspberry_pi_4b_2gb": 0.0})
    probabilities = class_probabilities(cfg.mix)
    names = list(DEVICE_CLASSES)
    assert probabilities[names.index("phone_3gb")] == pytest.approx(0.75)
    assert probabilities[names.index("phone_8gb")] == pytest.approx(0.25)
    drawn = [sample_budget(cfg, 2, pid).device_class for pid in range(2000)]
    assert set(drawn) == {"phone_3gb", "phone_8gb"}
    share = drawn.count("phone_3gb") / len(drawn)
    assert 0.70 < share < 0.80  # 0.75 +- 5 standard deviations (sd = 0.0097)


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ({"iphone_99": 1.0}, "valid names"),
        ({"phone_4gb": -1.0}, "phone_4gb"),
        ({"phone_4gb": 0.0, "phone_6gb": 0.0}, "all weights 0"),
        ({"phone_4gb": float("nan")}, "phone_4gb"),
        ({"phone_4gb": "many"}, "phone_4gb"),
    ],
)
def test_bad_mix_is_rejected(mix, message):
    with pytest.raises(ValueError, match=message):
        sample_budget(FleetConfig(mix=mix), 0, 0)


def test_bad_availability_range_and_ids_are_rejected():
    with pytest.raises(ValueError, match="availability_min"):
        sample_budget(FleetConfig(availability_min=0.9, availability_max=0.5), 0, 0)
    with pytest.raises(ValueError, match="partition_id"):
        sample_budget(FleetConfig(), 0, -1)


# --------------------------------------------------------------------------- fluctuation
def test_load_factor_lies_in_one_to_load_max_and_is_seeded():
    cfg = FleetConfig(load_max=5.0, load_prob=0.3)
    loads = [load_factor(cfg, 0, pid, 1) for pid in PIDS]
    assert all(1.0 <= load <= 5.0 for load in loads)
    slowed = sum(load > 1.0 for load in loads) / len(loads)
    assert 0.2 < slowed < 0.4  # load_prob 0.3, sd 0.023 over 400 draws
    assert loads == [load_factor(cfg, 0, pid, 1) for pid in PIDS]
    assert loads != [load_factor(cfg, 0, pid, 2) for pid in PIDS]  # a new round, new loads


def test_load_factor_is_one_without_co_running_apps_and_above_one_with():
    never = FleetConfig(load_prob=0.0)
    always = FleetConfig(load_prob=1.0, load_max=2.0)
    assert all(load_factor(never, 0, pid, 3) == 1.0 for pid in PIDS)
    assert all(1.0 < load_factor(always, 0, pid, 3) <= 2.0 for pid in PIDS)


def test_load_factor_rejects_bad_config():
    with pytest.raises(ValueError, match="load_max"):
        load_factor(FleetConfig(load_max=0.5), 0, 0, 1)
    with pytest.raises(ValueError, match="load_prob"):
        load_factor(FleetConfig(load_prob=1.5), 0, 0, 1)


def test_availability_follows_the_budget_probability():
    assert not any(is_available(_budget(availability=0.0), 0, pid, 1) for pid in PIDS)
    assert all(is_available(_budget(availability=1.0), 0, pid, 1) for pid in PIDS)
    half = [is_available(_budget(availability=0.5), 0, pid, 1) for pid in PIDS]
    assert 0.4 < sum(half) / len(half) < 0.6  # sd 0.025 over 400 draws
    assert half == [is_available(_budget(availability=0.5), 0, pid, 1) for pid in PIDS]


# --------------------------------------------------------------------------- records
def test_record_round_trip_is_flat_and_fits_flower_records():
    from flwr.app import ConfigRecord, MetricRecord

    budget = sample_budget(FleetConfig(), 0, 9)
    record = budget.to_record()
    assert all(isinstance(value, (str, float)) for value in record.values())
    assert DeviceBudget.from_record(record) == budget
    assert DeviceBudget.from_record(dict(ConfigRecord(record))) == budget
    numbers = MetricRecord(budget.to_record(include_class=False))
    assert DeviceBudget.from_record(dict(numbers), device_class=budget.device_class) == budget


@pytest.mark.parametrize("field", ["memory_bytes", "flops_per_s", "uplink_bps", "downlink_bps", "availability"])
def test_from_record_names_a_missing_or_negative_field(field):
    record = _budget().to_record()
    with pytest.raises(ValueError, match=field):
        DeviceBudget.from_record({k: v for k, v in record.items() if k != field})
    with pytest.raises(ValueError, match=field):
        DeviceBudget.from_record({**record, field: -1.0})


def test_from_record_rejects_missing_class_zero_speed_and_bad_availability():
    record = _budget().to_record()
    with pytest.raises(ValueError, match="device_class"):
        DeviceBudget.from_record({k: v for k, v in record.items() if k != "device_class"})
    with pytest.raises(ValueError, match="flops_per_s"):
        DeviceBudget.from_record({**record, "flops_per_s": 0.0})
    with pytest.raises(ValueError, match="availability"):
        DeviceBudget.from_record({**record, "availability": 1.5})
    with pytest.raises(ValueError, match="uplink_bps"):
        DeviceBudget.from_record({**record, "uplink_bps": "fast"})
