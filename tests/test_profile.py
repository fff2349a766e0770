"""A real device's profiled budget."""

import math

import pytest

from experiments.fleet.profile import available_memory_bytes, profile_local_budget


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        4096 kB\nMemFree:  1000 kB\nMemAvailable:    2048 kB\n")
    assert available_memory_bytes(str(meminfo)) == 2048 * 1024
    assert available_memory_bytes(str(tmp_path / "missing")) > 0  # os.sysconf fallback


def test_profile_local_budget_returns_positive_finite_numbers(tmp_path):
    import torch

    torch.set_num_threads(1)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:    1000000 kB\n")
    budget = profile_local_budget(1e6, 2e6, meminfo_path=str(meminfo), bench_seconds=0.05)
    assert budget.device_class == "profiled"
    assert budget.memory_bytes == pytest.approx(1000000 * 1024 * 0.8)
    assert budget.uplink_bps == 1e6 and budget.downlink_bps == 2e6
    assert math.isfinite(budget.flops_per_s) and budget.flops_per_s > 1e6
    real = profile_local_budget(1e6, 2e6, bench_seconds=0.05)
    assert 0 < real.memory_bytes < float("inf")
