"""A round's metrics in a Flower MetricRecord and back: groups, empty groups, no-value metrics, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MetricRecord

from strategies.metrics import metric_record, metric_values


def test_groups_and_no_values_are_written_as_flat_flower_metrics():
    values = {
        "accuracy": 0.5,
        "devices": 2,
        "teacher_accuracy": None,
        "online_accuracy_by_domain": {"fog": 0.75, "snow": 0.25},
        "uploaded_samples_by_device": {},
    }
    record = metric_record(values)
    assert isinstance(record, MetricRecord)
    assert list(record.keys()) == [
        "accuracy", "devices", "teacher_accuracy",
        "online_accuracy_by_domain/", "online_accuracy_by_domain/fog", "online_accuracy_by_domain/snow",
        "uploaded_samples_by_device/",
    ]
    assert record["online_accuracy_by_domain/"] == 2 and record["uploaded_samples_by_device/"] == 0
    assert math.isnan(record["teacher_accuracy"]) and record["devices"] == 2 and isinstance(record["devices"], int)


def test_reading_back_gives_the_same_values_in_the_same_order():
    values = {
        "accuracy": 0.5,
        "teacher_accuracy": None,
        "paths": {"0-1-3": 2, "2-2-3": 1},
        "uploaded_samples_by_device": {},
        "nested": {"a": {"b": 1.5}, "c": 3},
        "history": [0.1, 0.2],
    }
    back = metric_values(metric_record(values))
    assert back == values
    assert list(back) == list(values) and list(back["paths"]) == ["0-1-3", "2-2-3"]


def test_numpy_scalars_become_plain_numbers():
    record = metric_record({"n": np.int64(3), "x": np.float32(0.25)})
    assert record["n"] == 3 and type(record["n"]) is int
    assert record["x"] == 0.25 and type(record["x"]) is float


def test_nothing_to_record_is_none_and_none_reads_as_nothing():
    assert metric_record({}) is None and metric_record(None) is None
    assert metric_values(None) == {}


def test_a_plain_flower_record_reads_as_it_is_with_nan_as_no_value():
    assert metric_values(MetricRecord({"accuracy": 0.9, "loss": math.nan})) == {"accuracy": 0.9, "loss": None}


@pytest.mark.parametrize(
    "values, error, match",
    [
        ({"by/device": 1}, ValueError, "without '/'"),
        ({"group": {"": 1}}, ValueError, "non-empty string"),
        ({"group": {3: 1.0}}, ValueError, "must be a non-empty string"),
        ({"flag": True}, TypeError, "metric 'flag' is True"),
        ({"group": {"name": "fog"}}, TypeError, "metric 'group/name' is 'fog'"),
    ],
)
def test_values_a_metric_record_cannot_hold_are_refused_by_name(values, error, match):
    with pytest.raises(error, match=match):
        metric_record(values)


def test_a_group_whose_count_disagrees_with_its_members_is_refused():
    with pytest.raises(ValueError, match="declares 2 members but holds 1"):
        metric_values(MetricRecord({"g/": 2, "g/a": 1.0}))
