"""CEMA's cloud: adapt the foundation model on uploads, distil the edge model, send it back.

Per batch of :data:`models.cema_cloud.CLOUD_BATCH_SIZE` uploaded samples (CEMA poster,
"Replay-based Knowledge Distillation"; ``/work/shared/ALGORITHMS.md``, CEMA; official code
chenyaofo/CEMA ``codebase/core/tta/cema.py``): (1) one weighted entropy-minimisation step
of the foundation model, (2) the samples join a FIFO replay buffer, (3) one distillation
step of the edge model on them plus replayed samples. The edge model's BatchNorm entries
(affine parameters and running statistics) go back to the devices.

Edge models (issue 4, "configurable whether each device has its own edge model"):
``edge_models="shared"`` (default) keeps ONE edge model trained by the uploads of all devices in
partition-id order; ``"per_device"`` keeps one edge model per device, distilled only on that
device's uploads with its own replay buffer and optimiser, while the foundation model stays
shared (it learns from every upload). Per-device state is created on a device's first reply
from the initial edge model, so nothing per device is materialised up front.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, MessageType, RecordDict
from torch import nn

from models.cema_cloud import (
    CLOUD_BATCH_SIZE,
    EDGE_LR,
    FOUNDATION_LR,
    REPLAY_CAPACITY,
    SGD_MOMENTUM,
    ReplayBuffer,
    adapt_foundation,
    bn_sgd,
    distill_step,
)
from models.cema_filter import default_e_max0
from strategies.base import EdgeCloudStrategy

#: What the cloud sends after a device's first batch: BN entries only, or the full model.
SEND_MODES = ("bn", "full")
#: One edge model for the fleet, or one per device (issue 4).
EDGE_MODES = ("shared", "per_device")
#: Key of the single track in ``shared`` mode.
SHARED = -1
#: Stream tag that separates the replay draws from every other use of the run seed.
REPLAY_STREAM = 0xCE
#: The image shape every upload must have (uint8 NHWC, protocol "uploads" record).
UPLOAD_NDIM = 4


def bn_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer: affine parameters and running statistics.

    ``num_batches_tracked`` counts as a running statistic (it moves with them).
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
class EdgeTrack:
    """One edge model the cloud distils: its weights, optimiser, replay buffer and pending uploads.

    Attributes
    ----------
    model : nn.Module
        The edge network (student).
    optimizer : torch.optim.Optimizer
        SGD on its BN affine parameters.
    buffer : ReplayBuffer
        FIFO of the samples this edge model was distilled on.
    rng : np.random.Generator
        Replay draws of this track.
    pending : np.ndarray
        Uploads that did not fill a cloud batch yet (uint8 NHWC).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    buffer: ReplayBuffer
    rng: np.random.Generator
    pending: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 0), dtype=np.uint8))


class CEMA(EdgeCloudStrategy):
    """CEMA's cloud: foundation adaptation, replay buffer, entropy distillation to the edge.

    Parameters
    ----------
    foundation : nn.Module
        The pre-trained bigger model (the teacher); adapted in place.
    edge_factory : callable
        ``() -> nn.Module``: a fresh edge network; the strategy holds one and loads the
        arrays of each round into it.
    preprocess : callable
        uint8 NHWC pixels -> model input tensor (the apps pass ``experiments.data.to_tensor``).
    num_classes : int
        C; sets ``E0 = 0.4 ln C`` of the loss weights.
    send : {"bn", "full"}
        After a device's first participation (always the full model): the BN entries only
        (CEMA step 4) or the full edge state.
    replay_capacity : int
        Replay buffer size (official 10,000).
    foundation_lr, edge_lr, momentum : float
        SGD settings of the two models (official 2.5e-4, 2.5e-3, 0.9).
    cloud_batch_size : int
        Uploaded samples per cloud step (official 32); the remainder waits for the next round.
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
        if cloud_batch_size < 1:
            raise ValueError(f"cloud_batch_size={cloud_batch_size}; use at least 1 sample per cloud step")
        self.e0 = default_e_max0(num_classes)
        self.foundation = foundation
        self.edge_factory = edge_factory
        self.preprocess = preprocess
        self.send = send
        self.cloud_batch_size = cloud_batch_size
        self.edge_models = edge_models
        self.replay_capacity = replay_capacity
        self.edge_lr = edge_lr
        self.momentum = momentum
        self.foundation_optimizer = bn_sgd(foundation, foundation_lr, momentum)
        self.tracks: dict[int, EdgeTrack] = {}
        self.initial_state: dict[str, torch.Tensor] | None = None
        self.bn_keys = bn_state_keys(edge_factory())
        self.served: set[int] = set()
        self.online: dict[str, list[int]] = {}

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
    def configure_train(self, server_round, arrays, config, grid):
        """Full edge model to first-time devices, the ``send`` entries (of their edge model) to the others."""
        if self.initial_state is None:
            self.initial_state = arrays.to_torch_state_dict()
        if self.edge_models == "shared":
            self.track(SHARED).model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        full = RecordDict({"config": self.round_config(server_round), "arrays": arrays})
        keys = list(arrays.keys()) if self.send == "full" else self.bn_keys
        shared_update = self._update_record(server_round, arrays, keys)

        def content(pid: int) -> RecordDict:
            if pid not in self.served:
                return full
            if self.edge_models == "shared" or pid not in self.tracks:
                return shared_update
            return self._update_record(server_round, ArrayRecord(self.tracks[pid].model.state_dict()), keys)

        return self.messages_for(server_round, MessageType.TRAIN, content)

    def _update_record(self, server_round: int, arrays: ArrayRecord, keys: list[str]) -> RecordDict:
        return RecordDict({
            "config": self.round_config(server_round),
            "arrays": ArrayRecord({key: arrays[key] for key in keys}),
        })

    def aggregate_train(self, server_round, replies):
        """Count online accuracy, run the cloud steps on the uploads, return the edge state."""
        replies = list(replies)
        uploads, uploaded_bytes, by_device = {}, 0, {}
        for reply in replies:
            self.served.add(self.partition_of(reply))
            self._count_online(reply)
            record = reply.content.array_records.get("uploads")
            if record is None:
                continue
            pixels = record["pixels"].numpy() if "pixels" in record else None
            problem = _upload_problem(pixels)
            if problem is not None:
                self.ledger.fail(self.partition_of(reply), "train", f"rejected uploads: {problem}")
                continue
            uploads[self.partition_of(reply)] = pixels
            uploaded_bytes += len(record["pixels"].data)
            by_device[str(self.partition_of(reply))] = int(len(pixels))
        started = time.perf_counter()
        if self.edge_models == "shared":
            steps = self._cloud_steps(self.track(SHARED), [uploads[pid] for pid in sorted(uploads)])
        else:
            steps = sum(self._cloud_steps(self.track(pid), [uploads[pid]]) for pid in sorted(uploads))
        metrics = {
            **self.mean_metrics(replies),
            **self.online_metrics(),
            "uploaded_samples": int(sum(len(u) for u in uploads.values())),
            "uploaded_bytes": uploaded_bytes,
            "uploaded_samples_by_device": by_device,
            "cloud_steps": steps,
            "pending_uploads": int(sum(len(t.pending) for t in self.tracks.values())),
            "edge_models": len(self.tracks),
            "cloud_compute_s": time.perf_counter() - started,
        }
        if self.edge_models == "shared":
            return ArrayRecord(self.edge.state_dict()), metrics
        return None, metrics

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict:
        """The base state plus everything the cloud carries between rounds.

        ``served``, ``online``, the ``foundation`` model and its optimizer, the initial edge
        state and every edge track (:class:`EdgeTrack`: model, optimizer momentum, replay
        buffer, replay generator, pending uploads), keyed by partition id (or :data:`SHARED`).
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
                    "pending": track.pending.copy(),
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
            track.pending = np.asarray(saved["pending"], dtype=np.uint8)

    # ------------------------------------------------------------------ helpers
    def _count_online(self, reply) -> None:
        """Add a reply's prediction counts to its domain's cumulative tally."""
        domain = str(reply.content["stream"]["domain"])
        metrics = reply.content["metrics"]
        tally = self.online.setdefault(domain, [0, 0])
        tally[0] += int(metrics["correct"])
        tally[1] += int(metrics["num_examples"])

    def online_metrics(self) -> dict:
        """Cumulative online accuracy over all domains and per domain (protocol keys)."""
        correct = sum(c for c, _ in self.online.values())
        seen = sum(n for _, n in self.online.values())
        return {
            "online_accuracy": correct / seen if seen else None,
            "online_accuracy_by_domain": {d: c / n for d, (c, n) in sorted(self.online.items()) if n},
        }

    def _cloud_steps(self, track: EdgeTrack, uploads: list[np.ndarray]) -> int:
        """Adapt + replay + distil ``track`` per full cloud batch; keep the remainder pending."""
        pool = [track.pending] if len(track.pending) else []
        pool += [u for u in uploads if len(u)]
        if not pool:
            return 0
        pixels = np.concatenate(pool)
        full = len(pixels) // self.cloud_batch_size * self.cloud_batch_size
        track.pending = pixels[full:]
        for start in range(0, full, self.cloud_batch_size):
            x = self.preprocess(pixels[start : start + self.cloud_batch_size])
            adapt_foundation(self.foundation, x, self.e0, self.foundation_optimizer)
            track.buffer.add(x)
            distill_step(track.model, self.foundation, x, track.buffer, track.rng, track.optimizer, self.e0)
        return full // self.cloud_batch_size


def _upload_problem(pixels: np.ndarray | None) -> str | None:
    """Why one reply's uploads cannot be used (None if they are uint8 (k, H, W, C) images)."""
    if pixels is None:
        return "no 'pixels' array"
    if pixels.dtype != np.uint8 or pixels.ndim != UPLOAD_NDIM:
        return f"need uint8 (k, H, W, C) images, got {pixels.dtype} {pixels.shape}"
    return None
