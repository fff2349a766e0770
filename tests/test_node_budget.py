"""A device's budget from its node config, what a node remembers, and start-up timing."""

from __future__ import annotations

import logging
import os

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from experiments.client_app import _flops_per_sample, make_device
from experiments.config import from_flat
from experiments.fleet import startup
from experiments.fleet.budgets import DeviceBudget, sample_budget
from experiments.fleet.node_budget import DECLARED_CLASS, budget_mode, device_budget, local_budget
from experiments.fleet.node_memory import BUDGET_RECORD, FLOPS_RECORD, remembered, remembered_number

DECLARED = {"memory-bytes": 2e9, "flops-per-s": 5e10, "uplink-bps": 2.5e6, "downlink-bps": 1.25e7}
SMALL = {
    "algorithm.name": "fedavg", "fleet.devices": 3, "fleet.per_round": 3, "dataset.proxy_samples": 300,
    "dataset.global_test_samples": 200, "dataset.partition.size_min": 20, "dataset.partition.size_max": 40,
    "dataset.partition.test_size": 10, "model.width": 8,
}


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _fake_profiler(uplink_bps, downlink_bps, *, availability):
    return DeviceBudget("profiled", 3e9, 7e9, uplink_bps, downlink_bps, availability)


# --------------------------------------------------------------------------- modes
@pytest.mark.parametrize(
    ("node_config", "mode"),
    [
        ({}, "sampled"),
        ({"partition-id": 0, "num-partitions": 3}, "sampled"),  # what Flower's simulation gives
        ({"partition-id": 0, "memory-bytes": 1e9}, "given"),
        ({"device-class": "pi"}, "given"),
        ({"budget": "profile"}, "profile"),
        ({"budget": "sampled"}, "sampled"),
    ],
)
def test_budget_mode_follows_the_node_config(node_config, mode):
    assert budget_mode(node_config) == mode


def test_budget_mode_rejects_unknown_values_and_contradictions():
    with pytest.raises(ValueError, match=r"budget='measure' is unknown"):
        budget_mode({"budget": "measure"})
    with pytest.raises(ValueError, match=r"budget=\"sampled\" and also \['uplink-bps'\]"):
        budget_mode({"budget": "sampled", "uplink-bps": 1e6})


# --------------------------------------------------------------------------- declared budgets
def test_declared_budget_is_taken_as_given():
    assert local_budget({"partition-id": 1, **DECLARED}) == DeviceBudget(DECLARED_CLASS, 2e9, 5e10, 2.5e6, 1.25e7, 1.0)
    named = local_budget({**DECLARED, "device-class": "jetson-nano-4gb", "availability": 0.5, "uplink-bps": 3})
    assert named == DeviceBudget("jetson-nano-4gb", 2e9, 5e10, 3.0, 1.25e7, 0.5)


def test_sampled_budget_is_left_to_the_fleet_table():
    assert local_budget({"partition-id": 0, "num-partitions": 3}) is None


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"memory-bytes": 1e9, "uplink-bps": 1e6, "downlink-bps": 1e6}, r"lacks \['flops-per-s'\]"),
        ({"memory-bytes": 1e9, "flops-per-s": 1e9}, r"lacks \['uplink-bps', 'downlink-bps'\]"),
        ({**DECLARED, "flops-per-s": "fast"}, r"flops-per-s='fast' must be a finite number"),
        ({**DECLARED, "memory-bytes": True}, r"memory-bytes=True must be a finite number"),
        ({**DECLARED, "uplink-bps": float("inf")}, r"uplink-bps=inf must be a finite number"),
        ({**DECLARED, "memory-bytes": -1}, r"memory_bytes=-1.0 must be a finite number >= 0"),
        ({**DECLARED, "availability": 2}, r"availability=2.0 must be in \[0, 1\]"),
        ({**DECLARED, "device-class": ""}, r"device-class='' must be a non-empty string"),
        ({"budget": "profile"}, r"budget='profile' lacks \['uplink-bps', 'downlink-bps'\]"),
    ],
)
def test_bad_node_configs_are_rejected_with_the_key_named(node_config, message):
    with pytest.raises(ValueError, match=message):
        local_budget(node_config, profiler=_fake_profiler)


# --------------------------------------------------------------------------- profiled budgets
def test_profile_measures_memory_and_speed_and_takes_links_and_overrides_from_the_config():
    profiled = local_budget({"budget": "profile", "uplink-bps": 1e6, "downlink-bps": 4e6}, profiler=_fake_profiler)
    assert profiled == DeviceBudget("profiled", 3e9, 7e9, 1e6, 4e6, 1.0)
    capped = local_budget(
        {"budget": "profile", "uplink-bps": 1e6, "downlink-bps": 4e6, "memory-bytes": 1e8, "device-class": "pi"},
        profiler=_fake_profiler,
    )
    assert capped == DeviceBudget("pi", 1e8, 7e9, 1e6, 4e6, 1.0)


def test_a_profiled_budget_is_measured_once_per_node_and_kept_in_its_state():
    context = _context({"partition-id": 0, "budget": "profile", "uplink-bps": 1e6, "downlink-bps": 4e6})
    first = device_budget(context)
    assert first.device_class == "profiled" and first.flops_per_s > 0 and first.memory_bytes > 0
    assert dict(context.state.config_records[BUDGET_RECORD]) == first.to_record()
    # a new benchmark would give another speed: the same figures mean they were kept
    later = _context(dict(context.node_config))
    later.state = context.state
    assert device_budget(later) == first


# --------------------------------------------------------------------------- node memory
def test_remembered_values_are_computed_once_per_node_and_key():
    calls = []

    def compute(value):
        calls.append(value)
        return value

    context = _context({})
    assert remembered_number(context, "r", "a", lambda: compute(2.0)) == 2.0
    assert remembered_number(context, "r", "a", lambda: compute(3.0)) == 2.0
    assert remembered_number(context, "r", "b", lambda: compute(5.0)) == 5.0
    assert remembered(context, "s", lambda: compute({"x": 1.0})) == {"x": 1.0}
    assert remembered(context, "s", lambda: compute({"x": 9.0})) == {"x": 1.0}
    assert calls == [2.0, 5.0, {"x": 1.0}]
    assert remembered_number(None, "r", "a", lambda: compute(4.0)) == 4.0  # no context: no memory
    assert remembered(None, "s", lambda: compute({"y": 1.0})) == {"y": 1.0}
    assert calls[-2:] == [4.0, {"y": 1.0}]


# --------------------------------------------------------------------------- the ClientApp's device
def test_make_device_uses_a_declared_budget_without_simulated_load_or_outages():
    cfg = from_flat(SMALL)
    device = make_device(cfg, 1, _context({"partition-id": 1, **DECLARED}))
    assert dict(device.budget) == DeviceBudget(DECLARED_CLASS, 2e9, 5e10, 2.5e6, 1.25e7, 1.0).to_record()
    assert [device.load_factor(r) for r in range(1, 30)] == [1.0] * 29
    assert all(device.is_available(r) for r in range(1, 30))


def test_make_device_samples_the_budget_when_the_node_config_declares_none():
    cfg = from_flat(SMALL)
    simulated = make_device(cfg, 2, None)
    deployed = make_device(cfg, 2, _context({"partition-id": 2, "num-partitions": 3}))
    assert dict(deployed.budget) == dict(simulated.budget) == sample_budget(cfg.fleet, cfg.seed, 2).to_record()
    assert [deployed.load_factor(r) for r in range(1, 30)] == [simulated.load_factor(r) for r in range(1, 30)]


def test_make_device_counts_flops_once_per_node_and_reads_them_from_its_state():
    cfg = from_flat(SMALL)
    context = _context({"partition-id": 0})
    counted = make_device(cfg, 0, context).flops_per_sample
    assert counted == _flops_per_sample(cfg.model, 10, (3, 32, 32)) > 0
    (key,) = context.state.config_records[FLOPS_RECORD].keys()
    context.state[FLOPS_RECORD] = ConfigRecord({key: 123.0})  # what an earlier message stored
    assert make_device(cfg, 0, context).flops_per_sample == 123.0


# --------------------------------------------------------------------------- start-up timing
def test_process_age_reads_proc(tmp_path):
    stat, uptime = tmp_path / "stat", tmp_path / "uptime"
    ticks = os.sysconf("SC_CLK_TCK")
    # fields 3..21 are placeholders; field 22 (start time) is 10 s worth of ticks
    stat.write_text("4242 (a (tricky) name) S " + " ".join(["0"] * 18) + f" {10 * ticks} 0 0\n")
    uptime.write_text("25.50 40.00\n")
    assert startup.process_age_s(str(stat), str(uptime)) == pytest.approx(15.5)
    assert startup.process_age_s(str(tmp_path / "missing"), str(uptime)) is None
    assert 0 < startup.process_age_s() < 24 * 3600  # this test process, really


def test_message_age_and_the_first_message_log(monkeypatch):
    msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    assert startup.message_age_s(msg, now=msg.metadata.created_at + 2.5) == pytest.approx(2.5)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    monkeypatch.setattr(startup, "_logged", False)
    try:
        startup.log_first_message("query", msg)
        startup.log_first_message("train", msg)  # a warm process: nothing more
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 1 and lines[0].startswith(f"{startup.LOG_PREFIX} query handler started")
