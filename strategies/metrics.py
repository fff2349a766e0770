"""A round's metrics as a Flower ``MetricRecord``, and back.

Flower's ``Strategy.aggregate_train`` and ``aggregate_evaluate`` return ``MetricRecord``s:
string keys, values that are ints, floats or lists of them. A round's metrics are richer:

* groups: one value per device, per domain or per path (``online_accuracy_by_domain``,
  ``uploaded_samples_by_device``, ``paths``), possibly empty (a round without uploads);
* metrics without a value this round (None: ``teacher_accuracy`` before the teacher scored
  anything).

:func:`metric_record` writes a group ``g`` as the key ``g/`` holding its member count (so an
empty group survives) and one key ``g/m`` per member ``m`` (nested groups likewise), and None as
NaN, the replies' own "no value" (:mod:`strategies.reply_checks`). :func:`metric_values` reads it
back; the round record (``results.json``) is built from what it returns, so it holds the groups
and the Nones exactly as the strategy computed them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

from flwr.app import MetricRecord

#: Between a group's name and its member's in a flattened key.
GROUP_SEPARATOR = "/"
#: What a metric without a value becomes in a record (NaN: "no value", as in the replies).
NO_VALUE = math.nan


def metric_record(values: Mapping[str, Any] | None) -> MetricRecord | None:
    """``values`` as one flat MetricRecord (module docstring); None when there is nothing to record.

    Parameters
    ----------
    values : mapping or None
        Metric name -> int, float, None, list of numbers, or a mapping of the same (a group).

    Raises
    ------
    ValueError
        A name that is empty or holds :data:`GROUP_SEPARATOR`.
    TypeError
        A value that is none of the above (e.g. a bool or a string).
    """
    if not values:
        return None
    record = MetricRecord()
    _flatten(values, "", record)
    return record


def metric_values(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The metrics :func:`metric_record` wrote, with groups and Nones restored ({} for None).

    Raises
    ------
    ValueError
        A group whose member count does not match its members (a record not built by
        :func:`metric_record`).
    """
    values: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for key, value in (record or {}).items():
        *path, name = key.split(GROUP_SEPARATOR)
        group = _group(values, path)
        if key.endswith(GROUP_SEPARATOR):  # the group itself: ``name`` is "" here
            counts[GROUP_SEPARATOR.join(path)] = int(value)
        else:
            group[name] = None if isinstance(value, float) and math.isnan(value) else value
    for path, count in counts.items():
        members = _group(values, path.split(GROUP_SEPARATOR))
        if len(members) != count:
            raise ValueError(
                f"metric group {path!r} declares {count} members but holds {len(members)}; "
                "decode only records built by strategies.metrics.metric_record"
            )
    return values


def _flatten(values: Mapping[str, Any], prefix: str, record: MetricRecord) -> None:
    """Write ``values`` into ``record`` under ``prefix`` (groups as in the module docstring)."""
    for name, value in values.items():
        if not isinstance(name, str) or not name or GROUP_SEPARATOR in name:
            raise ValueError(
                f"metric name {name!r} under {prefix or 'the top'!r} must be a non-empty string "
                f"without {GROUP_SEPARATOR!r} (the group separator)"
            )
        key = prefix + name
        if isinstance(value, Mapping):
            record[key + GROUP_SEPARATOR] = len(value)
            _flatten(value, key + GROUP_SEPARATOR, record)
        else:
            record[key] = _metric_value(key, value)


def _metric_value(key: str, value: Any) -> int | float | list:
    """``value`` as a MetricRecord value: None -> NaN, numpy scalars -> int/float, lists as they are."""
    if value is None:
        return NO_VALUE
    if isinstance(value, list):
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"metric {key!r} is {value!r} ({type(value).__name__}); a MetricRecord holds ints, floats, "
            "lists of them, None (no value) or a mapping of those (a group)"
        )
    return int(value) if isinstance(value, Integral) else float(value)


def _group(values: dict[str, Any], path: list[str]) -> dict[str, Any]:
    """The (nested) group at ``path`` in ``values``, created if missing."""
    group = values
    for name in path:
        group = group.setdefault(name, {})
    return group
