"""Bytes a message really carries, counted from its records."""

from __future__ import annotations

from flwr.app import RecordDict

from strategies.protocol import ORACLE_RECORD

#: Bytes of a number in a config/metric record (int64/float64 on the wire).
NUMBER_BYTES = 8


def _value_bytes(value) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, (int, float)):
        return NUMBER_BYTES
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    raise TypeError(f"cannot size a record value of type {type(value).__name__}")


def payload_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content.

    Arrays count their serialized buffer (``Array.data``, what Flower sends); config and
    metric entries count their key (UTF-8) plus the value (8 bytes a number, 1 a bool,
    the UTF-8 length of a string, the length of bytes). Protocol framing and the
    :data:`strategies.protocol.ORACLE_RECORD` are not counted.
    """
    total = 0
    for name, record in content.items():
        if name == ORACLE_RECORD:
            continue
        total += len(name.encode("utf-8"))
        if name in content.array_records:
            total += sum(len(key.encode("utf-8")) + len(arr.data) for key, arr in record.items())
        else:
            total += sum(len(key.encode("utf-8")) + _value_bytes(v) for key, v in record.items())
    return total
