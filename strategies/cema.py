"""CEMA's cloud: adapt the foundation model on uploads, distil the edge model, send it back.

Each device's reply is one edge batch of the official loop (chenyaofo/CEMA
``codebase/core/tta/cema.py`` ``CEMA.infer``; CEMA poster, "Replay-based Knowledge
Distillation"): its uploads enter the replay history, every full cloud batch of
:data:`models.cema.cloud.CLOUD_BATCH_SIZE` pending uploads gets a foundation step and a
distillation step (with replay once the history holds 256), and an edge batch that fills no
cloud batch distils on replayed samples alone once the history holds more than 256
(:func:`models.cema.edge_batch.process_edge_batch`). The edge model's BatchNorm entries
(affine parameters and running statistics) go back to the devices.

Edge models: ``edge_models="shared"`` (default) keeps ONE edge model, fed the devices' edge
batches one after another in partition-id order, as the official loop is fed one stream;
``"per_device"`` keeps one edge model per device, distilled only on that device's uploads
with its own replay buffer and optimiser, while the foundation model stays shared (it learns
from every upload). Per-device state is created on a device's first upload from the initial
edge model, so nothing per device is materialised up front.

BatchNorm (:mod:`models.cema.tbr`): with ``bn="tbr"`` (official default) the foundation model
and every edge model start without statistics and take them from the first uploaded batch
they see; the devices take theirs from their first test batch and keep them until the edge
model sent back has statistics of its own (the reset marker travels with the BN entries).

Teacher accuracy: devices attach their uploads' labels (known in simulation only) in the
:data:`strategies.protocol.ORACLE_RECORD`; the cloud compares them with the teacher's classes
in each distillation step (``teacher_accuracy``). Labels never reach a training step and,
like every oracle record, are not counted as transmitted bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from models.cema.cloud import (
    CLOUD_BATCH_SIZE,
    EDGE_LR,
    FOUNDATION_LR,
    REPLAY_CAPACITY,
    SGD_MOMENTUM,
    ReplayBuffer,
    bn_sgd,
)
from models.cema.edge_batch import CloudSettings, Student, Teacher, process_edge_batch
from models.cema.filter import E_MAX_FRACTION, default_e_max0
from models.cema.tbr import BN_MODES, TBR, reset_state_statistics, reset_statistics
from strategies.base import EdgeCloudStrategy
from strategies.cema_tally import RoundTally, upload_labels
from strategies.metrics import metric_record
from strategies.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    CORRECT_KEY,
    DOMAIN_KEY,
    METRICS_RECORD,
    PIXELS_KEY,
    STREAM_RECORD,
    UPLOADS_RECORD,
    WEIGHT_KEY,
)

#: What the cloud sends after a device's first batch: BN entries only, or the full model.
SEND_MODES = ("bn", "full")
#: One edge model for the fleet, or one per device.
EDGE_MODES = ("shared", "per_device")
#: Key of the single track in ``shared`` mode.
SHARED = -1
#: Stream tag that separates the replay draws from every other use of the run seed.
REPLAY_STREAM = 0xCE
#: Dimensions of every upload (uint8 NHWC images in the ``uploads`` record).
UPLOAD_NDIM = 4


def bn_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer: affine parameters and running statistics.

    ``num_batches_tracked`` counts as a running statistic (it moves with them and carries
    TBR's reset marker).
    """
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys += [prefix + key for key in module.state_dict()]
    if not keys:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer; CEMA sends BN entries only")
    return keys


@dataclass
class EdgeTrack(Student):
    """One edge model the cloud distils (:class:`models.cema.edge_batch.Student`) and its uploads' labels.

    Attributes
    ----------
    pending_labels : np.ndarray
        Labels of the ``pending`` uploads (:data:`strategies.cema_tally.UNKNOWN_LABEL` where
        none came), for the teacher-accuracy metric only.
    """

    pending_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class CEMA(EdgeCloudStrategy):
    """CEMA's cloud: foundation adaptation, replay buffer, entropy distillation to the edge.

    Parameters
    ----------
    foundation : nn.Module
        The pre-trained bigger model (the teacher); adapted in place.
    edge_factory : callable
        ``() -> nn.Module``: a fresh edge network; each edge model the cloud distils is one,
        loaded with the initial edge state of the first round.
    preprocess : callable
        uint8 NHWC pixels -> model input tensor (the apps pass ``experiments.data.to_tensor``).
    num_classes : int
        C; sets ``E0 = e_max_fraction ln C`` of the loss weights.
    e_max_fraction : float
        ``E_max^0 / ln C`` (official conf ``ent_high_margin: 0.4``; the edge filter's ``e_max``).
    bn : {"tbr", "batch"}
        BatchNorm mode of the foundation and edge models (:mod:`models.cema.tbr`; official
        ``is_tbr: true``).
    send : {"bn", "full"}
        After a device's first participation (always the full model): the BN entries only
        (CEMA step 4) or the full edge state.
    replay_capacity : int
        Replay buffer size (official 10,000).
    foundation_lr, edge_lr, momentum : float
        SGD settings of the two models (official 2.5e-4, 2.5e-3, 0.9).
    cloud_batch_size : int
        Uploaded samples per cloud step (official 32); the remainder waits for the next edge batch.
    edge_models : {"shared", "per_device"}
        One edge model for every device, or one per device (each with its own replay buffer
        of ``replay_capacity`` samples).
    **base
        :class:`strategies.base.EdgeCloudStrategy` arguments (per_round, seed, ...).
    """

    def __init__(
        self,
        *,
        foundation: nn.Module,
        edge_factory: Callable[[], nn.Module],
        preprocess: Callable[[np.ndarray], torch.Tensor],
        num_classes: int,
        e_max_fraction: float = E_MAX_FRACTION,
        bn: str = TBR,
        send: str = "bn",
        replay_capacity: int = REPLAY_CAPACITY,
        foundation_lr: float = FOUNDATION_LR,
        edge_lr: float = EDGE_LR,
        momentum: float = SGD_MOMENTUM,
        cloud_batch_size: int = CLOUD_BATCH_SIZE,
        edge_models: str = "shared",
        **base,
    ) -> None:
        super().__init__(**base)
        if send not in SEND_MODES:
            raise ValueError(f"send={send!r}; choose one of {SEND_MODES}")
        if edge_models not in EDGE_MODES:
            raise ValueError(f"edge_models={edge_models!r}; choose one of {EDGE_MODES}")
        if bn not in BN_MODES:
            raise ValueError(f"bn={bn!r}; choose one of {BN_MODES} (algorithm.cema.tbr true/false)")
        if cloud_batch_size < 1:
            raise ValueError(f"cloud_batch_size={cloud_batch_size}; use at least 1 sample per cloud step")
        e0 = default_e_max0(num_classes, e_max_fraction)
        self.settings = CloudSettings(e0=e0, bn=bn, batch_size=cloud_batch_size)
        self.e0 = self.settings.e0
        self.teacher = Teacher(foundation, bn_sgd(foundation, foundation_lr, momentum))
        if bn == TBR:
            reset_statistics(foundation)  # official prepare_model_for_tent_tta drops the source statistics
        self.edge_factory = edge_factory
        self.preprocess = preprocess
        self.send = send
        self.edge_models = edge_models
        self.replay_capacity = replay_capacity
        self.edge_lr = edge_lr
        self.momentum = momentum
        self.tracks: dict[int, EdgeTrack] = {}
        self.initial_state: dict[str, torch.Tensor] | None = None
        self.bn_keys = bn_state_keys(edge_factory())
        self.served: set[int] = set()
        self.online: dict[str, list[int]] = {}

    @property
    def foundation(self) -> nn.Module:
        """The foundation model (the teacher)."""
        return self.teacher.model

    @property
    def foundation_optimizer(self) -> torch.optim.Optimizer:
        """SGD on the foundation model's BN affine parameters."""
        return self.teacher.optimizer

    @property
    def edge(self) -> nn.Module:
        """The shared edge model (``edge_models="shared"`` only)."""
        if self.edge_models != "shared":
            raise AttributeError("edge_models='per_device' has one edge model per device: use tracks[pid].model")
        return self.track(SHARED).model

    def track(self, key: int) -> EdgeTrack:
        """The edge track ``key`` (a partition id, or :data:`SHARED`), made from the initial edge model."""
        if key not in self.tracks:
            if self.initial_state is None:
                raise RuntimeError("no edge model yet: configure_train must run before the cloud steps")
            model = self.edge_factory()
            model.load_state_dict(self.initial_state, strict=True)
            self.tracks[key] = EdgeTrack(
                model=model,
                optimizer=bn_sgd(model, self.edge_lr, self.momentum),
                buffer=ReplayBuffer(self.replay_capacity),
                rng=np.random.default_rng([self.seed, REPLAY_STREAM] + ([] if key == SHARED else [key])),
            )
        return self.tracks[key]

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Full edge model to first-time devices, the ``send`` entries (of their edge model) to the others.

        The first call records ``arrays`` as the initial edge model, with TBR's reset marker
        (:func:`models.cema.tbr.reset_state_statistics`) when ``bn="tbr"``; afterwards the
        cloud's own edge models are what it sends.
        """
        if self.initial_state is None:
            state = arrays.to_torch_state_dict()
            tbr = self.settings.bn == TBR
            self.initial_state = reset_state_statistics(state, self.edge_factory()) if tbr else state
        if self.edge_models == "shared":
            current = ArrayRecord(self.track(SHARED).model.state_dict())
        else:
            current = ArrayRecord(self.initial_state)
        full = RecordDict({CONFIG_RECORD: self.round_config(server_round), ARRAYS_RECORD: current})
        keys = list(current.keys()) if self.send == "full" else self.bn_keys
        shared_update = self._update_record(server_round, current, keys)

        def content(pid: int) -> RecordDict:
            if pid not in self.served:
                return full
            if self.edge_models == "shared" or pid not in self.tracks:
                return shared_update
            return self._update_record(server_round, ArrayRecord(self.tracks[pid].model.state_dict()), keys)

        return self.messages_for(server_round, MessageType.TRAIN, content)

    def _update_record(self, server_round: int, arrays: ArrayRecord, keys: list[str]) -> RecordDict:
        return RecordDict({
            CONFIG_RECORD: self.round_config(server_round),
            ARRAYS_RECORD: ArrayRecord({key: arrays[key] for key in keys}),
        })

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count online accuracy, run each reply's edge batch through the cloud, return the edge state."""
        replies = list(replies)  # sorted by partition id (EdgeCloudStrategy.exchange)
        tally = RoundTally()
        started = time.perf_counter()
        for reply in replies:
            pid = self.partition_of(reply)
            self.served.add(pid)
            self._count_online(reply)
            pixels = self._uploads_of(reply, pid)
            if pixels is None:
                continue
            key = SHARED if self.edge_models == "shared" else pid
            if len(pixels) == 0 and key not in self.tracks:
                continue  # an edge model nobody uploaded to has no history: nothing to do
            tally.add_upload(pid, reply, pixels)
            self._edge_batch(self.track(key), pixels, upload_labels(reply, len(pixels)), tally)
        metrics = {
            **self.mean_metrics(replies),
            **self.online_metrics(),
            **tally.metrics(),
            "pending_uploads": int(sum(0 if t.pending is None else len(t.pending) for t in self.tracks.values())),
            "edge_models": len(self.tracks),
            "cloud_compute_s": time.perf_counter() - started,
        }
        if self.edge_models == "shared":
            return ArrayRecord(self.edge.state_dict()), metric_record(metrics)
        return None, metric_record(metrics)

    def _uploads_of(self, reply: Message, pid: int) -> np.ndarray | None:
        """The reply's uploaded pixels (empty when it uploaded nothing); None, recorded, if unusable."""
        record = reply.content.array_records.get(UPLOADS_RECORD)
        if record is None:
            return np.zeros((0, 0, 0, 0), dtype=np.uint8)
        pixels = record[PIXELS_KEY].numpy() if PIXELS_KEY in record else None
        problem = _upload_problem(pixels)
        if problem is not None:
            self.ledger.fail(pid, "train", f"rejected uploads: {problem}")
            return None
        return pixels

    def _edge_batch(self, track: EdgeTrack, pixels: np.ndarray, labels: np.ndarray, tally: RoundTally) -> None:
        """One official edge batch on ``track``; the teacher's classes are scored against ``labels``."""
        x = self.preprocess(pixels) if len(pixels) else torch.zeros(0)
        steps = process_edge_batch(self.teacher, track, x, self.settings)
        queue = np.concatenate([track.pending_labels, labels])
        used = sum(len(p) for p in steps.teacher_predictions)
        if used:
            predicted = torch.cat(steps.teacher_predictions).numpy()
            tally.add_teacher(predicted, queue[:used])
        track.pending_labels = queue[used:]
        tally.cloud_steps += steps.cloud_steps
        tally.replay_steps += steps.replay_steps

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict:
        """The base state plus everything the cloud carries between rounds.

        ``served``, ``online``, the ``foundation`` model and its optimizer, the initial edge
        state and every edge track (:class:`EdgeTrack`: model, optimizer momentum, replay
        buffer, replay generator, pending uploads and their labels), keyed by partition id
        (or :data:`SHARED`).
        """
        state = super().state_dict()
        state.update(
            served=sorted(self.served),
            online={domain: list(tally) for domain, tally in self.online.items()},
            foundation=self.foundation.state_dict(),
            foundation_optimizer=self.foundation_optimizer.state_dict(),
            initial_state=self.initial_state,
            tracks=[
                {
                    "key": key,
                    "model": track.model.state_dict(),
                    "optimizer": track.optimizer.state_dict(),
                    "buffer": track.buffer.state_dict(),
                    "rng": track.rng.bit_generator.state,
                    "pending": track.pending,
                    "pending_labels": track.pending_labels.copy(),
                }
                for key, track in sorted(self.tracks.items())
            ],
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (a strategy built with the same settings)."""
        super().load_state_dict(state)
        self.served = {int(pid) for pid in state["served"]}
        self.online = {str(domain): [int(c), int(n)] for domain, (c, n) in state["online"].items()}
        self.foundation.load_state_dict(state["foundation"], strict=True)
        self.foundation_optimizer.load_state_dict(state["foundation_optimizer"])
        self.initial_state = state["initial_state"]
        self.tracks = {}
        for saved in state["tracks"]:
            track = self.track(int(saved["key"]))
            track.model.load_state_dict(saved["model"], strict=True)
            track.optimizer.load_state_dict(saved["optimizer"])
            track.buffer.load_state_dict(saved["buffer"])
            track.rng.bit_generator.state = saved["rng"]
            track.pending = saved["pending"]
            track.pending_labels = np.asarray(saved["pending_labels"], dtype=np.int64)

    # ------------------------------------------------------------------ helpers
    def _count_online(self, reply) -> None:
        """Add a reply's prediction counts to its domain's cumulative tally."""
        domain = str(reply.content[STREAM_RECORD][DOMAIN_KEY])
        metrics = reply.content[METRICS_RECORD]
        tally = self.online.setdefault(domain, [0, 0])
        tally[0] += int(metrics[CORRECT_KEY])
        tally[1] += int(metrics[WEIGHT_KEY])

    def online_metrics(self) -> dict:
        """Cumulative online accuracy over all domains and per domain (protocol keys)."""
        correct = sum(c for c, _ in self.online.values())
        seen = sum(n for _, n in self.online.values())
        return {
            "online_accuracy": correct / seen if seen else None,
            "online_accuracy_by_domain": {d: c / n for d, (c, n) in sorted(self.online.items()) if n},
        }


def _upload_problem(pixels: np.ndarray | None) -> str | None:
    """Why one reply's uploads cannot be used (None if they are uint8 (k, H, W, C) images)."""
    if pixels is None:
        return "no 'pixels' array"
    if pixels.dtype != np.uint8 or pixels.ndim != UPLOAD_NDIM:
        return f"need uint8 (k, H, W, C) images, got {pixels.dtype} {pixels.shape}"
    return None
