"""What every edge-cloud strategy shares.

Seeded cohorts keyed by partition id (Flower's ``sample_nodes`` is unseeded and sees only
random node ids), a one-time discovery that maps node ids to partition ids and collects
each device's reported budget, one message per device, bytes counted on the real
messages, failures collected instead of raised, and a round record per round whose
virtual time is the slowest participant's.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from models.clock import comm_time_s, round_time_s
from strategies.aggregate import weighted_metric
from strategies.payload import payload_bytes
from strategies.reply_checks import reply_problem

#: Stream tag that separates cohort draws from every other use of the run seed.
COHORT_STREAM = 0xC0
#: How often discovery polls the grid for connected nodes (seconds).
DISCOVERY_POLL_S = 0.2

EvaluateFn = Callable[[int, ArrayRecord], Mapping[str, float] | None]
RoundSink = Callable[[dict[str, Any]], None]
RoundHook = Callable[[int, ArrayRecord], None]


@dataclass
class DeviceInfo:
    """What the cloud knows of a device: only what the device reported."""

    partition_id: int
    node_id: int
    num_examples: int
    budget: dict[str, float | str]


@dataclass
class RoundLedger:
    """Bytes, per-device virtual times and failures gathered during one round."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    device_time_s: dict[int, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    completed: set[int] = field(default_factory=set)

    def fail(self, partition_id: int | None, phase: str, reason: str) -> None:
        """Record a device that did not contribute, with the reason."""
        self.failures.append({"partition_id": partition_id, "phase": phase, "reason": reason})
        log(INFO, "device %s failed in %s: %s", partition_id, phase, reason)


class EdgeCloudStrategy(Strategy):
    """Base of every strategy: discovery, seeded cohorts, byte and time accounting.

    Subclasses implement ``configure_train``/``aggregate_train`` (and optionally
    ``configure_evaluate``/``aggregate_evaluate``) using :meth:`cohort` and
    :meth:`messages_for`; :meth:`start` runs the rounds.

    Parameters
    ----------
    per_round : int
        Devices sampled per round (cohort size).
    seed : int
        The run's seed; the cohort of round r depends only on (seed, r) and the
        partition ids present.
    expected_devices : int
        Devices to wait for at discovery.
    round_timeout_s : float
        A device that has not replied after this long counts as failed.
    deadline_s : float or None
        Virtual-time deadline: training replies slower than this are dropped.
    evaluate_fn : callable, optional
        ``(round, arrays) -> {"accuracy": ...}``: the cloud model on the global test set.
    on_round : callable, optional
        Receives each finished round record.
    """

    def __init__(
        self,
        *,
        per_round: int,
        seed: int,
        expected_devices: int,
        round_timeout_s: float = 300.0,
        deadline_s: float | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_round: RoundSink | None = None,
    ) -> None:
        if per_round < 1:
            raise ValueError(f"per_round must be >= 1, got {per_round}")
        self.per_round = per_round
        self.seed = seed
        self.expected_devices = expected_devices
        self.round_timeout_s = round_timeout_s
        self.deadline_s = deadline_s
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.devices: dict[int, DeviceInfo] = {}
        self._by_node: dict[int, int] = {}
        self.ledger = RoundLedger()
        self._cohorts: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ discovery
    def discover(self, grid: Grid, timeout_s: float | None = None) -> None:
        """Ask every connected node for its partition id, data size and budget (once)."""
        timeout_s = self.round_timeout_s if timeout_s is None else timeout_s
        node_ids = self._wait_for_nodes(grid, timeout_s)
        query = RecordDict({"config": ConfigRecord({"round": 0})})
        messages = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for reply in grid.send_and_receive(messages, timeout=timeout_s):
            if reply.has_error():
                log(WARNING, "node %s did not answer discovery: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            metrics = reply.content["metrics"]
            info = DeviceInfo(
                partition_id=int(metrics["partition_id"]),
                node_id=reply.metadata.src_node_id,
                num_examples=int(metrics["num_examples"]),
                budget=dict(reply.content["budget"]),
            )
            self.devices[info.partition_id] = info
            self._by_node[info.node_id] = info.partition_id
        if not self.devices:
            raise RuntimeError("no device answered discovery; check that the SuperNodes/ClientApps start")
        log(INFO, "discovered %d devices", len(self.devices))

    def _wait_for_nodes(self, grid: Grid, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < self.expected_devices and time.monotonic() < deadline:
            time.sleep(DISCOVERY_POLL_S)
            node_ids = list(grid.get_node_ids())
        return sorted(node_ids)

    # ------------------------------------------------------------------ cohorts & messages
    def cohort(self, server_round: int) -> list[int]:
        """Partition ids sampled for a round: seeded by (seed, round), same every call."""
        if server_round not in self._cohorts:
            ids = sorted(self.devices)
            rng = np.random.default_rng([self.seed, server_round, COHORT_STREAM])
            size = min(self.per_round, len(ids))
            picked = rng.choice(len(ids), size=size, replace=False)
            self._cohorts[server_round] = sorted(ids[i] for i in picked)
        return self._cohorts[server_round]

    def messages_for(
        self,
        server_round: int,
        message_type: str,
        contents: Mapping[int, RecordDict] | Callable[[int], RecordDict],
        partition_ids: Iterable[int] | None = None,
    ) -> list[Message]:
        """One message per device; ``contents`` maps (or computes) each device's record."""
        ids = self.cohort(server_round) if partition_ids is None else list(partition_ids)
        make = contents if callable(contents) else contents.__getitem__
        return [
            Message(make(pid), dst_node_id=self.devices[pid].node_id, message_type=message_type)
            for pid in ids
        ]

    @staticmethod
    def round_config(server_round: int, **extra: int | float | str | bool) -> ConfigRecord:
        """The ``config`` record every message carries (the round, plus ``extra``)."""
        return ConfigRecord({"round": server_round, **extra})

    # ------------------------------------------------------------------ exchange
    def exchange(self, grid: Grid, messages: list[Message], phase: str) -> list[Message]:
        """Send, wait, count bytes and time, and keep the replies that may be used.

        Error replies, missing replies (timeout), replies that fail the checks against
        the message the device was sent (:func:`strategies.reply_checks.reply_problem`:
        unknown keys, wrong shapes or dtypes, NaN; counted as ``"rejected: <problem>"``,
        bytes counted, no device time) and, in training, replies slower than the deadline
        are recorded as failures; only the rest are returned.
        """
        if not messages:
            return []
        ledger = self.ledger
        down, sent = {}, {}
        for msg in messages:
            pid = self._by_node[msg.metadata.dst_node_id]
            sent[pid] = msg.content
            down[pid] = payload_bytes(msg.content)
            ledger.downlink_bytes += down[pid]
        replies = list(grid.send_and_receive(messages, timeout=self.round_timeout_s))
        # Flower's grids set each sent message's id in place; a reply names the message it
        # answers. Match on that first: an error reply the SuperLink writes for a dead node
        # ("Node Unavailable") carries the SuperLink's node id, not the device's.
        by_message = {
            msg.metadata.message_id: self._by_node[msg.metadata.dst_node_id] for msg in messages if msg.metadata.message_id
        }
        kept, answered = [], set()
        for reply in replies:
            answers = reply.metadata.reply_to_message_id
            pid = by_message[answers] if answers in by_message else self._by_node.get(reply.metadata.src_node_id)
            if pid not in sent:
                self._reject(None, phase, f"reply from node {reply.metadata.src_node_id}, which was not asked")
                continue
            answered.add(pid)
            if self._admit(reply, pid, phase, sent[pid], down[pid]):
                kept.append(reply)
        for pid in sorted(down.keys() - answered):
            ledger.fail(pid, phase, f"no reply within {self.round_timeout_s} s")
        return sorted(kept, key=self.partition_of)  # arrival order must not change the sums

    def _admit(self, reply: Message, pid: int, phase: str, sent: RecordDict, down: int) -> bool:
        """Account one answer of device ``pid``; True if its reply may be used."""
        ledger = self.ledger
        if reply.has_error():
            ledger.fail(pid, phase, reply.error.reason)
            return False
        up = payload_bytes(reply.content)
        ledger.uplink_bytes += up
        problem = reply_problem(reply.content, sent)
        if problem is not None:
            self._reject(pid, phase, problem)
            return False
        metrics = reply.content.metric_records.get("metrics", MetricRecord())
        budget = self.devices[pid].budget
        spent = float(metrics.get("compute_time_s", 0.0)) + comm_time_s(
            up, down, float(budget["uplink_bps"]), float(budget["downlink_bps"])
        )
        ledger.device_time_s[pid] = ledger.device_time_s.get(pid, 0.0) + spent
        if phase == "train" and self.deadline_s is not None and spent > self.deadline_s:
            ledger.fail(pid, phase, f"straggler: {spent:.1f} s > deadline {self.deadline_s} s")
            return False
        ledger.completed.add(pid)
        return True

    def _reject(self, partition_id: int | None, phase: str, problem: str) -> None:
        """Count a reply that must not be used as a failure, with the reason logged."""
        log(WARNING, "rejected the %s reply of device %s: %s", phase, partition_id, problem)
        self.ledger.fail(partition_id, phase, f"rejected: {problem}")

    def partition_of(self, reply: Message) -> int:
        """Partition id of the device that sent ``reply``."""
        return self._by_node[reply.metadata.src_node_id]

    # ------------------------------------------------------------------ the run
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        *,
        first_round: int = 1,
        after_round: RoundHook | None = None,
    ) -> ArrayRecord:
        """Discover devices, then run rounds ``first_round..num_rounds``; returns the final cloud arrays.

        Parameters
        ----------
        grid : Grid
            Flower's grid.
        initial_arrays : ArrayRecord
            The cloud model before ``first_round`` (a checkpoint's arrays when resuming).
        num_rounds : int
            The last round.
        first_round : int
            1 for a new run; ``last checkpointed round + 1`` when resuming, after
            :meth:`load_state_dict` restored the strategy.
        after_round : callable, optional
            ``(round, arrays) -> None`` after each round's record was emitted (the apps write
            checkpoints there).
        """
        if first_round < 1:
            raise ValueError(f"first_round must be >= 1, got {first_round}")
        if not self.devices:
            self.discover(grid)
        arrays = initial_arrays
        for server_round in range(first_round, num_rounds + 1):
            arrays = self.run_round(grid, server_round, arrays)
            if after_round is not None:
                after_round(server_round, arrays)
        return arrays

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """What the strategy carries from one round to the next, as plain data.

        Dicts, lists, numbers, strings, numpy arrays and tensors only (a checkpoint stores it
        without pickling). The base keeps the cohorts drawn so far; subclasses with state of
        their own extend it. Devices and their node ids are not part of it: a resumed run
        discovers them again.
        """
        return {"cohorts": [[r, list(ids)] for r, ids in sorted(self._cohorts.items())]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before :meth:`start` resumes)."""
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(
                f"{type(self).__name__} state lacks {missing}; pass what {type(self).__name__}.state_dict() returned"
            )
        self._cohorts = {int(r): [int(pid) for pid in ids] for r, ids in state["cohorts"]}

    def run_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Train, aggregate, evaluate one round and emit its record."""
        started = time.perf_counter()
        self.ledger = RoundLedger()
        replies = self.exchange(grid, list(self.configure_train(server_round, arrays, ConfigRecord(), grid)), "train")
        new_arrays, train_metrics = self.aggregate_train(server_round, replies)
        arrays = arrays if new_arrays is None else new_arrays
        eval_messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="global-eval") as pool:
            # the cloud's own test runs while the devices evaluate (it waits on them otherwise)
            global_eval = pool.submit(self.evaluate_fn, server_round, arrays) if self.evaluate_fn else None
            eval_metrics = self.aggregate_evaluate(server_round, self.exchange(grid, eval_messages, "evaluate"))
            global_metrics = global_eval.result() if global_eval is not None else None
        record = self.round_record(server_round, train_metrics, eval_metrics, global_metrics)
        record["wall_time_s"] = time.perf_counter() - started
        if self.on_round is not None:
            self.on_round(record)
        return arrays

    def round_record(
        self,
        server_round: int,
        train_metrics: Mapping[str, Any] | None,
        eval_metrics: Mapping[str, Any] | None,
        global_metrics: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """The round's record: accuracy (devices' local tests), bytes, virtual time, failures."""
        ledger = self.ledger
        sim_time, _ = round_time_s(ledger.device_time_s)
        source = eval_metrics if eval_metrics and eval_metrics.get("accuracy") is not None else train_metrics
        record: dict[str, Any] = {
            "round": server_round,
            "accuracy": (source or {}).get("accuracy"),
            "global_accuracy": (global_metrics or {}).get("accuracy"),
            "uplink_bytes": ledger.uplink_bytes,
            "downlink_bytes": ledger.downlink_bytes,
            "sim_time_s": sim_time,
            "cohort": self.cohort(server_round),
            "clients": sorted(ledger.completed),
            "failures": ledger.failures,
        }
        for name, value in (train_metrics or {}).items():
            if name != "accuracy":
                record[name if name.startswith("train_") else f"train_{name}"] = value
        return record

    # ------------------------------------------------------------------ metric helpers
    @staticmethod
    def mean_metrics(replies: list[Message], weight_key: str = "num_examples") -> dict[str, float]:
        """Example-weighted mean of every numeric metric the replies share."""
        if not replies:
            return {}
        records = [r.content["metrics"] for r in replies]
        names = set.intersection(*(set(m.keys()) for m in records)) - {"partition_id", weight_key}
        weights = [float(m.get(weight_key, 1.0)) for m in records]
        out = {name: weighted_metric([float(m[name]) for m in records], weights) for name in sorted(names)}
        out["devices"] = len(replies)
        return {k: v for k, v in out.items() if v is not None}

    def summary(self) -> None:
        """Log the strategy's settings (Flower's Strategy contract)."""
        log(INFO, "%s: %d per round, seed %d", type(self).__name__, self.per_round, self.seed)

    # Default: no evaluation phase.
    def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, replies):  # noqa: D102
        return self.mean_metrics(list(replies), "num_examples") or None
