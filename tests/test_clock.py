"""The virtual clock against hand-computed numbers."""

import pytest

from models.clock import comm_time_s, compute_time_s, round_time_s


def test_compute_time_hand_computed():
    # 2e9 FLOPs at 1e9 FLOP/s, slowed 1.5x by co-running apps: 2 s x 1.5 = 3 s
    assert compute_time_s(2e9, 1e9, load=1.5) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="load"):
        compute_time_s(2e9, 1e9, load=0.5)
    with pytest.raises(ValueError, match="train_flops"):
        compute_time_s(-1.0, 1e9, load=1.0)


def test_comm_time_hand_computed():
    # 1e6 B up at 5e5 B/s = 2 s, plus 2e6 B down at 1e6 B/s = 2 s
    assert comm_time_s(1e6, 2e6, 5e5, 1e6) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="uplink_bytes"):
        comm_time_s(-1.0, 0.0, 1.0, 1.0)


def test_round_time_is_the_slowest_device_without_deadline():
    assert round_time_s({"a": 3.0, "b": 7.5, "c": 1.0}, None) == (7.5, [])
    assert round_time_s({}, None) == (0.0, [])


def test_deadline_drops_stragglers():
    times = {"a": 3.0, "b": 7.5, "c": 1.0, "d": 6.0}
    assert round_time_s(times, deadline_s=5.0) == (3.0, ["b", "d"])
    assert round_time_s(times, deadline_s=6.0) == (6.0, ["b"])  # exactly on time is kept
    assert round_time_s(times, deadline_s=0.5) == (0.5, ["a", "b", "c", "d"])  # all dropped
    with pytest.raises(ValueError, match="deadline_s"):
        round_time_s(times, deadline_s=0.0)
    with pytest.raises(ValueError, match="device_times"):
        round_time_s({"a": float("nan")}, None)




def test_zero_rates_are_rejected():
    with pytest.raises(ValueError, match="flops_per_s"):
        compute_time_s(1.0, 0.0)
    with pytest.raises(ValueError, match="downlink_bps"):
        comm_time_s(1.0, 1.0, 1.0, 0.0)
