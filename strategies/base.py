"""What every edge-cloud strategy shares.

Seeded cohorts keyed by partition id (Flower's ``sample_nodes`` is unseeded and sees only
random node ids), a one-time discovery that maps node ids to partition ids and collects
each device's reported budget, one message per device, bytes counted on the real
messages, failures collected instead of raised, and a round record per round whose
virtual time is the slowest participant's.

Flower's contracts hold: :meth:`EdgeCloudStrategy.start` has ``Strategy.start``'s signature
and returns its ``Result``; ``aggregate_train``/``aggregate_evaluate`` return Flower's records
(:mod:`strategies.metrics` turns a round's grouped metrics into a ``MetricRecord`` and back);
replies are weighted by Flower's ``num-examples``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from models.clock import comm_time_s, round_time_s
from strategies.aggregate import weighted_metric
from strategies.metrics import metric_record, metric_values
from strategies.payload import payload_bytes
from strategies.protocol import (
    ACCURACY_KEY,
    BUDGET_RECORD,
    COMPUTE_TIME_KEY,
    CONFIG_RECORD,
    METRICS_RECORD,
    PARTITION_KEY,
    ROUND_KEY,
    WEIGHT_KEY,
)
from strategies.reply_checks import reply_problem

#: Stream tag that separates cohort draws from every other use of the run seed.
COHORT_STREAM = 0xC0
#: How often discovery polls the grid for connected nodes (seconds).
DISCOVERY_POLL_S = 0.2
#: How long the cloud waits for replies until :meth:`EdgeCloudStrategy.start` sets its
#: ``timeout`` (seconds; the default of Flower's ``Strategy.start``).
REPLY_TIMEOUT_S = 3600.0
#: Rounds :meth:`EdgeCloudStrategy.start` runs when not told (the default of Flower's ``Strategy.start``).
DEFAULT_NUM_ROUNDS = 3
#: Prefix of the round record's training metrics (``loss`` -> ``train_loss``).
TRAIN_PREFIX = "train_"

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
RoundSink = Callable[[dict[str, Any]], None]
RoundHook = Callable[[int, ArrayRecord], None]
DeviceScore = Callable[[int, int], float]


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
    deadline_s : float or None
        Virtual-time deadline: training replies slower than this are dropped.
    on_round : callable, optional
        Receives each finished round record.
    after_round : callable, optional
        ``(round, arrays) -> None`` after each round's record was emitted (the apps write
        checkpoints there); also settable as the attribute of that name.
    pretrained_accuracy : callable, optional
        ``(partition_id, round) -> float``: the pre-trained model's accuracy on that device's
        local test data in that round, what doing nothing (NA) would score there. The round
        record's ``pretrained_accuracy`` averages it over the devices that completed the round,
        weighted like ``accuracy`` by their training-set size, so ``accuracy`` minus it is what
        the round's adaptation bought. It reads the devices' data, which only a simulation has
        (None: the record holds None).

    Attributes
    ----------
    round_timeout_s : float
        How long the cloud waits for replies: ``start``'s ``timeout`` once it runs.
    after_round : callable or None
        See the parameter; the apps set it once the checkpointer, which needs the strategy,
        exists.
    """

    def __init__(
        self,
        *,
        per_round: int,
        seed: int,
        expected_devices: int,
        deadline_s: float | None = None,
        on_round: RoundSink | None = None,
        after_round: RoundHook | None = None,
        pretrained_accuracy: DeviceScore | None = None,
    ) -> None:
        if per_round < 1:
            raise ValueError(f"per_round must be >= 1, got {per_round}")
        self.per_round = per_round
        self.seed = seed
        self.expected_devices = expected_devices
        self.round_timeout_s = REPLY_TIMEOUT_S
        self.deadline_s = deadline_s
        self.on_round = on_round
        self.after_round = after_round
        self.pretrained_accuracy = pretrained_accuracy
        self.devices: dict[int, DeviceInfo] = {}
        self._by_node: dict[int, int] = {}
        self.ledger = RoundLedger()
        self._cohorts: dict[int, list[int]] = {}
        self._first_round = 1

    # ------------------------------------------------------------------ discovery
    def discover(self, grid: Grid, timeout_s: float | None = None) -> None:
        """Ask every connected node for its partition id, data size and budget (once).

        ``timeout_s`` bounds the wait for nodes and for their answers (default:
        :attr:`round_timeout_s`).
        """
        timeout_s = self.round_timeout_s if timeout_s is None else timeout_s
        node_ids = self._wait_for_nodes(grid, timeout_s)
        query = RecordDict({CONFIG_RECORD: ConfigRecord({ROUND_KEY: 0})})
        messages = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for reply in grid.send_and_receive(messages, timeout=timeout_s):
            if reply.has_error():
                log(WARNING, "node %s did not answer discovery: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            metrics = reply.content[METRICS_RECORD]
            info = DeviceInfo(
                partition_id=int(metrics[PARTITION_KEY]),
                node_id=reply.metadata.src_node_id,
                num_examples=int(metrics[WEIGHT_KEY]),
                budget=dict(reply.content[BUDGET_RECORD]),
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
        return ConfigRecord({ROUND_KEY: server_round, **extra})

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
        metrics = reply.content.metric_records.get(METRICS_RECORD, MetricRecord())
        budget = self.devices[pid].budget
        spent = float(metrics.get(COMPUTE_TIME_KEY, 0.0)) + comm_time_s(
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
    def resume_after(self, server_round: int) -> None:
        """Make the next :meth:`start` continue with round ``server_round + 1``.

        Call it after :meth:`load_state_dict` restored the checkpoint of ``server_round``, and
        pass that checkpoint's arrays to :meth:`start` as ``initial_arrays``.
        """
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise ValueError(f"resume_after takes the last finished round, an int >= 0; got {server_round!r}")
        self._first_round = server_round + 1

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = DEFAULT_NUM_ROUNDS,
        timeout: float = REPLY_TIMEOUT_S,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Discover the devices, run the rounds, return Flower's ``Result``.

        Flower's ``Strategy.start`` contract, run the project's way: the devices are discovered
        first (unless the apps already did), a resumed run starts after the round given to
        :meth:`resume_after`, every round emits its record (``on_round``) and then calls
        ``after_round``, and ``evaluate_fn`` runs after each round while the devices evaluate
        (not before round 1: the apps score the pre-trained model themselves, during discovery).

        Parameters
        ----------
        grid : Grid
            Flower's grid.
        initial_arrays : ArrayRecord
            The cloud model before the first round run (a checkpoint's arrays when resuming).
        num_rounds : int
            The last round.
        timeout : float
            Seconds the cloud waits for replies, in discovery and in every exchange.
        train_config, evaluate_config : ConfigRecord, optional
            Entries added to the ``config`` record of every train (evaluate) message.
        evaluate_fn : callable, optional
            ``(round, arrays) -> MetricRecord | None``: the cloud model on the global test set.

        Returns
        -------
        Result
            ``arrays``: the cloud model after the last round (the initial one if no round changed
            it); per round, the MetricRecords of training, device evaluation and ``evaluate_fn``.
        """
        log(INFO, "Starting %s strategy, rounds %d..%d", type(self).__name__, self._first_round, num_rounds)
        self.summary()
        self.round_timeout_s = float(timeout)
        if not self.devices:
            self.discover(grid)
        result = Result(arrays=initial_arrays)
        for server_round in range(self._first_round, num_rounds + 1):
            result.arrays = self.run_round(
                grid, server_round, result.arrays, train_config=train_config,
                evaluate_config=evaluate_config, evaluate_fn=evaluate_fn, result=result,
            )
            if self.after_round is not None:
                self.after_round(server_round, result.arrays)
        return result

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

    def run_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        *,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        result: Result | None = None,
    ) -> ArrayRecord:
        """Train, aggregate, evaluate one round, emit its record; the cloud arrays after it.

        The keywords are :meth:`start`'s; ``result`` receives the round's MetricRecords.
        """
        started = time.perf_counter()
        self.ledger = RoundLedger()
        train_messages = self.configure_train(server_round, arrays, train_config or ConfigRecord(), grid)
        replies = self.exchange(grid, self.with_run_config(train_messages, train_config), "train")
        new_arrays, train_metrics = self.aggregate_train(server_round, replies)
        arrays = arrays if new_arrays is None else new_arrays
        eval_messages = self.configure_evaluate(server_round, arrays, evaluate_config or ConfigRecord(), grid)
        eval_messages = self.with_run_config(eval_messages, evaluate_config)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="global-eval") as pool:
            # the cloud's own test runs while the devices evaluate (it waits on them otherwise)
            global_eval = pool.submit(evaluate_fn, server_round, arrays) if evaluate_fn else None
            eval_metrics = self.aggregate_evaluate(server_round, self.exchange(grid, eval_messages, "evaluate"))
            global_metrics = _global_metrics(global_eval.result()) if global_eval is not None else None
        record = self.round_record(server_round, train_metrics, eval_metrics, global_metrics)
        record["wall_time_s"] = time.perf_counter() - started
        if self.on_round is not None:
            self.on_round(record)
        if result is not None:
            _add_round(result, server_round, train_metrics, eval_metrics, global_metrics)
        return arrays

    def with_run_config(self, messages: Iterable[Message], config: ConfigRecord | None) -> list[Message]:
        """``messages`` with ``config``'s entries added to each one's ``config`` record.

        Raises
        ------
        ValueError
            ``config`` sets an entry the strategy sets itself to another value (the round,
            a rate, a module list...): such settings are the strategy's constructor arguments.
        """
        messages = list(messages)
        for msg in messages if config else ():
            own = msg.content.config_records.get(CONFIG_RECORD)
            if own is None:
                own = msg.content[CONFIG_RECORD] = ConfigRecord()
            clash = sorted(key for key, value in config.items() if key in own and own[key] != value)
            if clash:
                raise ValueError(
                    f"the run's config sets {clash}, which {type(self).__name__} sets itself in its messages; "
                    "pass such settings as the strategy's constructor arguments"
                )
            for key, value in config.items():
                own[key] = value
        return messages

    def round_record(
        self,
        server_round: int,
        train_metrics: MetricRecord | None,
        eval_metrics: MetricRecord | None,
        global_metrics: MetricRecord | None,
    ) -> dict[str, Any]:
        """The round's record: accuracy (devices' local tests), bytes, virtual time, failures.

        The training metrics follow as ``train_<name>``, with their groups and Nones restored
        (:func:`strategies.metrics.metric_values`).
        """
        ledger = self.ledger
        sim_time, _ = round_time_s(ledger.device_time_s)
        record: dict[str, Any] = {
            "round": server_round,
            "accuracy": self.local_metrics(train_metrics, eval_metrics).get(ACCURACY_KEY),
            "global_accuracy": metric_values(global_metrics).get(ACCURACY_KEY),
            "pretrained_accuracy": self.cohort_pretrained_accuracy(server_round, sorted(ledger.completed)),
            "uplink_bytes": ledger.uplink_bytes,
            "downlink_bytes": ledger.downlink_bytes,
            "sim_time_s": sim_time,
            "cohort": self.cohort(server_round),
            "clients": sorted(ledger.completed),
            "failures": ledger.failures,
        }
        for name, value in metric_values(train_metrics).items():
            if name != ACCURACY_KEY:
                record[name if name.startswith(TRAIN_PREFIX) else TRAIN_PREFIX + name] = value
        return record

    def cohort_pretrained_accuracy(self, server_round: int, partition_ids: list[int]) -> float | None:
        """The pre-trained model's accuracy on ``partition_ids``' local tests, weighted by training-set size.

        None without a ``pretrained_accuracy`` scorer or devices; devices whose test set is
        empty (NaN) are left out, as the round's ``accuracy`` leaves them out.
        """
        if self.pretrained_accuracy is None:
            return None
        scores = [self.pretrained_accuracy(pid, server_round) for pid in partition_ids]
        return weighted_metric(scores, [float(self.devices[pid].num_examples) for pid in partition_ids])

    @staticmethod
    def local_metrics(train_metrics: MetricRecord | None, eval_metrics: MetricRecord | None) -> dict[str, Any]:
        """The metrics of the round's local tests: the evaluation's if it measured accuracy, else training's."""
        evaluated = metric_values(eval_metrics)
        return evaluated if evaluated.get(ACCURACY_KEY) is not None else metric_values(train_metrics)

    # ------------------------------------------------------------------ metric helpers
    @staticmethod
    def mean_metrics(replies: list[Message], weight_key: str = WEIGHT_KEY) -> dict[str, float]:
        """Example-weighted mean of every numeric metric the replies share."""
        if not replies:
            return {}
        records = [r.content[METRICS_RECORD] for r in replies]
        names = set.intersection(*(set(m.keys()) for m in records)) - {PARTITION_KEY, weight_key}
        weights = [float(m.get(weight_key, 1.0)) for m in records]
        out = {name: weighted_metric([float(m[name]) for m in records], weights) for name in sorted(names)}
        out["devices"] = len(replies)
        return {k: v for k, v in out.items() if v is not None}

    def summary(self) -> None:
        """Log the strategy's settings (Flower's Strategy contract)."""
        log(INFO, "%s: %d per round, seed %d", type(self).__name__, self.per_round, self.seed)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No evaluation phase unless a strategy adds one."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the replies' metrics (None without replies)."""
        return metric_record(self.mean_metrics(list(replies)))


def _global_metrics(value: Any) -> MetricRecord | None:
    """What ``evaluate_fn`` returned, checked against Flower's contract (a MetricRecord or None)."""
    if value is None or isinstance(value, MetricRecord):
        return value
    raise TypeError(
        f"evaluate_fn returned a {type(value).__name__}; return a MetricRecord "
        "(e.g. MetricRecord({'accuracy': 0.9})) or None, as Flower's Strategy.start expects"
    )


def _add_round(
    result: Result,
    server_round: int,
    train: MetricRecord | None,
    evaluate: MetricRecord | None,
    global_: MetricRecord | None,
) -> None:
    """File a round's MetricRecords in Flower's ``Result`` (rounds without a record stay absent)."""
    for records, metrics in (
        (result.train_metrics_clientapp, train),
        (result.evaluate_metrics_clientapp, evaluate),
        (result.evaluate_metrics_serverapp, global_),
    ):
        if metrics is not None:
            records[server_round] = metrics
