"""Edge handler of the online test-time-adaptation baselines (CEMA, seed 000, "Baselines").

Each round the device predicts its next stream batch, then adapts to it with one of the
adapters of :mod:`models.tta.registry`; the model and the adapter's state persist in ``context.state``.
``eta_upload`` is ETA whose kept (reliable, non-redundant) samples go up to the cloud, the
upload rule CEMA compares against (ALGORITHMS.md, CEMA part).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context, Message
from torch import nn

from clients.base import Device, MalformedMessage, model_from, round_of
from clients.online import OnlineClient
from clients.protocol import ARRAYS_RECORD, COMPUTE_TIME_KEY, PARTITION_KEY
from models.tta.base import OnlineAdapter
from models.tta.registry import adapter_names, adapter_parameters, build_adapter

#: ETA whose kept samples are uploaded (CEMA's "ETA + upload" baseline).
ETA_UPLOAD = "eta_upload"


def method_names() -> tuple[str, ...]:
    """Methods a :class:`TTAClient` accepts in ``Device.options["method"]``, sorted."""
    return tuple(sorted((*adapter_names(), ETA_UPLOAD)))


def adapter_for(method: str) -> str:
    """The :mod:`models.tta.registry` adapter behind ``method`` (``eta_upload`` runs ETA)."""
    if method not in method_names():
        raise ValueError(f"unknown on-device TTA method {method!r}; choose one of {method_names()}")
    return "eta" if method == ETA_UPLOAD else method


def device_seed(device: Device) -> int:
    """The seed of a device's random adapter draws (CoTTA's augmentations and restore masks)."""
    return int(np.random.default_rng([device.seed, device.partition_id]).integers(2**31))


def classes_of(model: nn.Module) -> int:
    """Number of classes of ``model``: the output width of its last ``nn.Linear`` layer."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot infer num_classes: the model has no nn.Linear head; "
                         "pass Device.options['num_classes']")
    return linears[-1].out_features


class TTAClient(OnlineClient):
    """Predict-then-adapt on the device's stream, one batch per round.

    ``Device.options``: ``method`` (one of :func:`method_names`), optional ``hyper`` (keyword
    hyper-parameters of that adapter, e.g. ``{"lr": 1e-3}``; the apps pass every one, resolved for
    the dataset's reference family; missing ones take the CIFAR family's reference values) and
    optional ``num_classes`` (default: inferred from the model's last linear layer). An adapter
    that draws random numbers and gets no ``seed`` is seeded by :func:`device_seed`.

    The first batch needs the source model in the message's ``arrays``; later batches resume
    from the model and adapter state saved in ``context.state`` (arrays, if sent, are ignored).

    Virtual compute time is charged as ``Device.flops_per_sample`` (training FLOPs: forward and
    backward) x batch size for every method. This over-charges forward-only methods (source,
    bn_adapt, lame: about 1/3 of that) and under-charges CoTTA (augmented teacher passes); it is
    an approximation kept uniform across methods on purpose.

    Parameters
    ----------
    device : Device
        The device; it must have a ``stream``.
    """

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        method = device.options.get("method")
        if method not in method_names():
            raise ValueError(f"Device.options['method'] is {method!r}; choose one of {method_names()}")
        hyper = device.options.get("hyper", {})
        if not isinstance(hyper, dict):
            raise ValueError(f"Device.options['hyper'] must be a dict of keyword arguments, got {hyper!r}")
        self.method = method
        self.hyper: dict[str, Any] = dict(hyper)

    @property
    def adapter_name(self) -> str:
        """The :mod:`models.tta.registry` adapter behind ``method`` (``eta_upload`` runs ETA)."""
        return adapter_for(self.method)

    def train(self, msg: Message, context: Context) -> Message:
        """Predict the next stream batch, adapt to it, save progress, reply with online accuracy."""
        server_round = round_of(msg)
        self.restore_progress(context, server_round)
        batch = self.next_batch(context)
        adapter = self.restore_adapter(msg, context)
        logits = adapter.predict_then_adapt(batch.x)
        uploads = self.uploads(adapter, batch.pixels)
        self.keep_progress(context, server_round, self.stream_index(context) + 1, adapter.state_dict())
        metrics = {
            COMPUTE_TIME_KEY: self.compute_time_s(len(batch.y), server_round),
            "load_factor": self.device.load_factor(server_round),
            PARTITION_KEY: self.device.partition_id,
        }
        return self.batch_reply(msg, batch, logits, metrics, uploads)

    def restore_adapter(self, msg: Message, context: Context) -> OnlineAdapter:
        """The adapter as after the previous batch, or on the received source model (first batch)."""
        blob = self.load_blob(context)
        if blob is None:
            if ARRAYS_RECORD not in msg.content.array_records:
                raise MalformedMessage(f"the device's first batch needs the source model in {ARRAYS_RECORD!r}")
            model = model_from(msg, self.device)
        else:
            model = self.device.build_model()
        num_classes = int(self.device.options.get("num_classes", classes_of(model)))
        hyper = dict(self.hyper)
        if "seed" in adapter_parameters(self.adapter_name):
            hyper.setdefault("seed", device_seed(self.device))
        try:
            adapter = build_adapter(self.adapter_name, model, num_classes, **hyper)
        except ValueError as exc:
            raise MalformedMessage(f"cannot build adapter {self.adapter_name!r}: {exc}") from exc
        if blob is not None:
            adapter.load_state_dict(blob)
        return adapter

    def uploads(self, adapter: OnlineAdapter, pixels: np.ndarray) -> np.ndarray | None:
        """Raw pixels of the samples ETA kept (``eta_upload`` only; None otherwise)."""
        if self.method != ETA_UPLOAD:
            return None
        mask = getattr(adapter, "last_kept_mask", None)
        if mask is None:
            return pixels[:0]
        return pixels[mask.cpu().numpy().astype(bool)]
