"""How long a message waited before its handler started (the ClientApp's start-up cost).

Under ``flower-supernode`` every message starts a fresh ``flwr-clientapp`` process
(interpreter, Flower, torch, the app), so a device pays this start-up per message; in
Flower's simulation an actor process is reused and pays it once. The ClientApp logs one
line for the first message a process handles: the process's age (its cold start) and
the message's age (from its creation on the cloud, including the SuperNode's polling).
"""

from __future__ import annotations

import os
import time
from logging import INFO

from flwr.app import Message
from flwr.supercore import log

PROC_STAT = "/proc/self/stat"  # Linux proc(5): field 22 is the start time in clock ticks
PROC_UPTIME = "/proc/uptime"  # Linux proc(5): seconds since boot
#: Field 22 of /proc/self/stat, counted after the ")" that ends the command name (field 2).
START_TIME_FIELD_AFTER_COMM = 22 - 3
#: Prefix of the log line (grep for it in the SuperNode's output).
LOG_PREFIX = "edgecloud start-up:"

_logged = False  # per process: only a process's first message shows its cold start


def process_age_s(stat_path: str = PROC_STAT, uptime_path: str = PROC_UPTIME) -> float | None:
    """Seconds since this process started (10 ms resolution), or None off Linux."""
    try:
        with open(stat_path, encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open(uptime_path, encoding="ascii") as uptime:
            since_boot = float(uptime.read().split()[0])
        start_ticks = int(fields[START_TIME_FIELD_AFTER_COMM])
        return since_boot - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def message_age_s(msg: Message, now: float | None = None) -> float:
    """Seconds since the cloud created ``msg`` (``metadata.created_at``; clocks must agree)."""
    return (time.time() if now is None else now) - float(msg.metadata.created_at)


def log_first_message(action: str, msg: Message) -> None:
    """Log the start-up figures for the first message this process handles."""
    global _logged
    if _logged:
        return
    _logged = True
    age = process_age_s()
    log(
        INFO,
        "%s %s handler started %s s after its process started, %.2f s after the cloud sent the message",
        LOG_PREFIX,
        action,
        "?" if age is None else f"{age:.2f}",
        message_age_s(msg),
    )
