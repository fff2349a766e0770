"""CEMA's cloud: adapt the foundation model on uploads, distil the edge model, send it back.

Per batch of :data:`models.cema_cloud.CLOUD_BATCH_SIZE` uploaded samples (CEMA poster,
"Replay-based Knowledge Distillation"; ``/work/shared/ALGORITHMS.md``, CEMA; official code
chenyaofo/CEMA ``codebase/core/tta/cema.py``): (1) one weighted entropy-minimisation step
of the foundation model, (2) the samples join a FIFO replay buffer, (3) one distillation
step of the edge model on them plus replayed samples. The edge model's BatchNorm entries
(affine parameters and running statistics) go back to the devices.

Scope: ONE edge model shared by every device (the uploads of all devices train it, in
partition-id order). Per-device edge models are left for later.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
        **base,
    ) -> None:
        super().__init__(**base)
        if send not in SEND_MODES:
            raise ValueError(f"send={send!r}; choose one of {SEND_MODES}")
        if cloud_batch_size < 1:
            raise ValueError(f"cloud_batch_size={cloud_batch_size}; use at least 1 sample per cloud step")
        self.e0 = default_e_max0(num_classes)
        self.foundation = foundation
        self.edge = edge_factory()
        self.preprocess = preprocess
        self.send = send
        self.cloud_batch_size = cloud_batch_size
        self.bn_keys = bn_state_keys(self.edge)
        self.buffer = ReplayBuffer(replay_capacity)
        self.foundation_optimizer = bn_sgd(foundation, foundation_lr, momentum)
        self.edge_optimizer = bn_sgd(self.edge, edge_lr, momentum)
        self.rng = np.random.default_rng([self.seed, REPLAY_STREAM])
        self.served: set[int] = set()
        self.online: dict[str, list[int]] = {}
        self.pending = np.zeros((0, 0, 0, 0), dtype=np.uint8)

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round, arrays, config, grid):
        """Full edge model to first-time devices, the ``send`` entries to the others."""
        self.edge.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        full = RecordDict({"config": self.round_config(server_round), "arrays": arrays})
        keys = list(arrays.keys()) if self.send == "full" else self.bn_keys
        update = RecordDict({
            "config": self.round_config(server_round),
            "arrays": ArrayRecord({key: arrays[key] for key in keys}),
        })
        return self.messages_for(server_round, MessageType.TRAIN, lambda pid: update if pid in self.served else full)

    def aggregate_train(self, server_round, replies):
        """Count online accuracy, run the cloud steps on the uploads, return the edge state."""
        replies = list(replies)
        uploads, uploaded_bytes, by_device = [], 0, {}
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
            uploads.append(pixels)
            uploaded_bytes += len(record["pixels"].data)
            by_device[str(self.partition_of(reply))] = int(len(pixels))
        started = time.perf_counter()
        steps = self._cloud_steps(uploads)
        metrics = {
            **self.mean_metrics(replies),
            **self.online_metrics(),
            "uploaded_samples": int(sum(len(u) for u in uploads)),
            "uploaded_bytes": uploaded_bytes,
            "uploaded_samples_by_device": by_device,
            "cloud_steps": steps,
            "pending_uploads": len(self.pending),
            "cloud_compute_s": time.perf_counter() - started,
        }
        return ArrayRecord(self.edge.state_dict()), metrics

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict:
        """The base state plus everything the cloud carries between rounds.

        ``served``, ``online``, the ``pending`` uploads, the replay ``buffer``, the replay
        generator's state (``rng``), the ``foundation`` model and both optimizers (momentum
        buffers). The edge model itself is the run's cloud arrays, reloaded every round.
        """
        state = super().state_dict()
        state.update(
            served=sorted(self.served),
            online={domain: list(tally) for domain, tally in self.online.items()},
            pending=self.pending.copy(),
            buffer=self.buffer.state_dict(),
            rng=self.rng.bit_generator.state,
            foundation=self.foundation.state_dict(),
            foundation_optimizer=self.foundation_optimizer.state_dict(),
            edge_optimizer=self.edge_optimizer.state_dict(),
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (a strategy built with the same settings)."""
        super().load_state_dict(state)
        self.served = {int(pid) for pid in state["served"]}
        self.online = {str(domain): [int(c), int(n)] for domain, (c, n) in state["online"].items()}
        self.pending = np.asarray(state["pending"], dtype=np.uint8)
        self.buffer.load_state_dict(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        self.foundation.load_state_dict(state["foundation"], strict=True)
        self.foundation_optimizer.load_state_dict(state["foundation_optimizer"])
        self.edge_optimizer.load_state_dict(state["edge_optimizer"])

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

    def _cloud_steps(self, uploads: list[np.ndarray]) -> int:
        """Adapt + replay + distil per full cloud batch; keep the remainder pending."""
        pool = [self.pending] if len(self.pending) else []
        pool += [u for u in uploads if len(u)]
        if not pool:
            return 0
        pixels = np.concatenate(pool)
        full = len(pixels) // self.cloud_batch_size * self.cloud_batch_size
        self.pending = pixels[full:]
        for start in range(0, full, self.cloud_batch_size):
            x = self.preprocess(pixels[start : start + self.cloud_batch_size])
            adapt_foundation(self.foundation, x, self.e0, self.foundation_optimizer)
            self.buffer.add(x)
            distill_step(self.edge, self.foundation, x, self.buffer, self.rng, self.edge_optimizer, self.e0)
        return full // self.cloud_batch_size


def _upload_problem(pixels: np.ndarray | None) -> str | None:
    """Why one reply's uploads cannot be used (None if they are uint8 (k, H, W, C) images)."""
    if pixels is None:
        return "no 'pixels' array"
    if pixels.dtype != np.uint8 or pixels.ndim != UPLOAD_NDIM:
        return f"need uint8 (k, H, W, C) images, got {pixels.dtype} {pixels.shape}"
    return None
