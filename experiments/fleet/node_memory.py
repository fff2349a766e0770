"""What a device works out once and keeps in ``context.state`` for the rest of the run.

Under ``flower-supernode`` (Flower 1.41, ``--isolation subprocess``) every message is
handled by a fresh ``flwr-clientapp`` process, so an in-process cache lives for one
message only; the node's ``context.state`` is what survives from message to message.
A device's profiled budget (a benchmark: it must not change between rounds) and its
training FLOPs per sample (the FLOP counter imports ``torch._dynamo``, about 1 s) are
kept there under the names below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, Context

#: ``context.state`` record of the device's profiled budget.
BUDGET_RECORD = "edgecloud.budget"
#: ``context.state`` record of training FLOPs per sample, keyed by model config hash.
FLOPS_RECORD = "edgecloud.flops_per_sample"

Values = Mapping[str, float | str]


def remembered(context: Context | None, name: str, compute: Callable[[], Values]) -> dict[str, float | str]:
    """``compute()`` on the node's first call, the stored values on later calls.

    Parameters
    ----------
    context : Context or None
        The message's context; None computes every time (nothing to keep it in).
    name : str
        Name of the ``ConfigRecord`` in ``context.state``.
    compute : callable
        Returns flat ``{key: number or string}`` values.
    """
    if context is None:
        return dict(compute())
    record = context.state.config_records.get(name)
    if record is not None:
        return dict(record)
    values = dict(compute())
    context.state[name] = ConfigRecord(values)
    return values


def remembered_number(context: Context | None, name: str, key: str, compute: Callable[[], float]) -> float:
    """One number under ``key`` of record ``name``, computed once per node and key."""
    if context is None:
        return float(compute())
    record = context.state.config_records.get(name)
    if record is None:
        record = ConfigRecord()
        context.state[name] = record
    if key not in record:
        record[key] = float(compute())
    return float(record[key])
