"""CEMA's edge: predict each stream batch, upload only the samples the cloud can learn from.

The edge never trains (CEMA poster, "Dynamic entropy-based sample filtration"): it runs the
edge model forward on the incoming batch, keeps the prediction (online accuracy) and uploads
the samples that pass the :class:`models.cema.filter.UploadFilter`. The cloud adapts the edge
model and sends back its BatchNorm entries (or the full model, always on a device's first
batch).

The prediction's BatchNorm follows the official ``infer`` (chenyaofo/CEMA
``codebase/core/tta/cema.py``: ``set_bn_training_mode(edge, False)``): with TBR
(:mod:`models.cema.tbr`, official default) the layers normalise with their TBR statistics,
taken from the device's first test batch and replaced by the cloud's once the edge model sent
back has statistics of its own; without TBR, with each test batch's statistics.

In simulation the labels of the uploaded samples travel beside them in the oracle record
(:data:`clients.protocol.ORACLE_RECORD`), for the cloud's teacher-accuracy metric only.

The device remembers its edge model and its filter state between rounds in
``context.state`` (through :meth:`clients.online.OnlineClient.keep_progress`).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from torch import nn

from clients.base import MalformedMessage, round_of
from clients.online import OnlineClient
from clients.protocol import ARRAYS_RECORD, COMPUTE_TIME_KEY, ORACLE_RECORD, PARTITION_KEY
from models.cema.filter import UploadFilter
from models.cema.tbr import BATCH, TBR, bn_mode, without_unset_statistics

#: Share of the training FLOPs per sample that one forward pass costs: the backward pass
#: costs about twice the forward (Kaplan et al. 2020, "Scaling laws", C ~ 6N per token of
#: which 2N forward), and the device's ``flops_per_sample`` is measured for training.
FORWARD_FLOP_FRACTION = 1.0 / 3.0
#: Device options (``Device.options``) passed to :class:`UploadFilter` when present.
FILTER_OPTIONS = (
    "e_max_fraction",
    "e_min_fraction",
    "threshold_coeff",
    "warmup_samples",
    "cosine_margin",
    "history_momentum",
)
#: Entry of the oracle record holding the uploads' labels, in upload order.
UPLOAD_LABELS = "upload_labels"
#: TBR when the device's options do not say (official conf ``is_tbr: true``).
DEFAULT_TBR = True
#: ``edge_bn`` choices for the prediction's BN: None as the official ``infer`` (TBR statistics
#: with TBR on, the test batch's statistics with it off), "batch" always the test batch's,
#: "running" plain eval mode with the model's running statistics.
EDGE_BN_CHOICES = (None, "batch", "running")


class CEMAClient(OnlineClient):
    """CEMA's edge handler: forward-only inference, entropy-based upload filter.

    ``train`` expects a message with a ``config`` record (the round) and, optionally, an
    ``arrays`` record: the full edge state dict (required on the device's first batch) or
    a subset of its entries (by default the BatchNorm affine parameters and running
    statistics), which replaces just those entries of the device's edge model.
    """

    def train(self, msg: Message, context: Context) -> Message:
        """Predict the next stream batch, upload the filtered samples, remember the state."""
        server_round = round_of(msg)
        self.restore_progress(context, server_round)
        batch = self.next_batch(context)
        model, upload_filter = self._restore(msg, context)
        options = self.device.options
        logits = edge_logits(model, batch.x, options.get("tbr", DEFAULT_TBR), options.get("edge_bn"))
        if upload_filter is None:
            upload_filter = self._new_filter(int(logits.shape[1]))
        mask = upload_filter.select(logits).numpy()
        uploads = batch.pixels[mask]
        state = {"model": model.state_dict(), "filter": upload_filter.state_dict()}
        self.keep_progress(context, server_round, self.stream_index(context) + 1, state)
        metrics = {
            COMPUTE_TIME_KEY: self.compute_time_s(len(batch.y) * FORWARD_FLOP_FRACTION, server_round),
            PARTITION_KEY: self.device.partition_id,
        }
        reply = self.batch_reply(msg, batch, logits, metrics, uploads)
        if len(uploads):
            labels = [int(label) for label in batch.y[torch.from_numpy(mask)]]
            reply.content[ORACLE_RECORD] = ConfigRecord({UPLOAD_LABELS: labels})
        return reply

    # ---------------------------------------------------------------- state
    def _restore(self, msg: Message, context: Context) -> tuple[nn.Module, UploadFilter | None]:
        """The edge model (saved, then updated by the message) and the saved filter, if any."""
        saved = self.load_blob(context)
        model = self.device.build_model()
        if saved is not None:
            model.load_state_dict(saved["model"], strict=True)
        arrays = msg.content.array_records.get(ARRAYS_RECORD)
        if arrays is None and saved is None:
            raise MalformedMessage(f"the device's first CEMA message must carry the full edge model in {ARRAYS_RECORD!r}")
        if arrays is not None:
            load_edge_arrays(model, arrays.to_torch_state_dict(), first=saved is None)
        upload_filter = None
        if saved is not None:
            upload_filter = self._new_filter(int(saved["filter"]["num_classes"]))
            upload_filter.load_state_dict(saved["filter"])
        return model, upload_filter

    def _new_filter(self, num_classes: int) -> UploadFilter:
        """A fresh filter for ``num_classes`` outputs, with the device's filter options."""
        options = {name: self.device.options[name] for name in FILTER_OPTIONS if name in self.device.options}
        return UploadFilter(num_classes, **options)


def edge_logits(model: nn.Module, x: torch.Tensor, tbr: bool, edge_bn: str | None) -> torch.Tensor:
    """The edge model's prediction on test batch ``x`` (no gradient; BN per the module docstring).

    Parameters
    ----------
    model : nn.Module
        The device's edge model; with TBR, layers without statistics take them from ``x``.
    x : Tensor
        The test batch.
    tbr : bool
        ``algorithm.cema.tbr``.
    edge_bn : {None, "batch", "running"}
        None: as the official code (TBR statistics, or batch statistics without TBR);
        ``"batch"``: the test batch's statistics; ``"running"``: plain eval mode.
    """
    if edge_bn not in EDGE_BN_CHOICES:
        raise ValueError(f"edge_bn={edge_bn!r}; choose one of {EDGE_BN_CHOICES}")
    with torch.no_grad():
        if edge_bn == "running":
            model.eval()
            return model(x)
        mode = BATCH if edge_bn == "batch" or not tbr else TBR
        with bn_mode(model, mode, train=False):
            return model(x)


def load_edge_arrays(model: nn.Module, received: dict[str, Any], *, first: bool) -> None:
    """Load the cloud's edge entries into ``model``.

    After the first batch, the statistics of BN layers whose received reset marker is 0 are
    not loaded (:func:`models.cema.tbr.without_unset_statistics`): the device keeps its own.

    Parameters
    ----------
    model : nn.Module
        The device's edge model (changed in place).
    received : dict of str to Tensor
        A full state dict (loaded strictly) or a subset of its entries (only those change).
    first : bool
        Whether this is the device's first batch; then ``received`` must be the full model.

    Raises
    ------
    MalformedMessage
        Unknown keys, wrong shapes, or a partial record on the first batch.
    """
    own = model.state_dict()
    unknown = sorted(set(received) - set(own))
    if unknown:
        raise MalformedMessage(f"arrays hold keys the edge model does not have: {unknown[:3]}")
    missing = sorted(set(own) - set(received))
    if first and missing:
        raise MalformedMessage(f"the first CEMA message must carry the full edge model; missing {missing[:3]}")
    for key, value in received.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise MalformedMessage(f"{key} has shape {tuple(value.shape)}, the edge model has {tuple(own[key].shape)}")
    if not first:
        received = without_unset_statistics(received, model)
        missing = sorted(set(own) - set(received))
    try:
        model.load_state_dict(received, strict=not missing)
    except (RuntimeError, ValueError) as exc:
        raise MalformedMessage(f"arrays do not fit the edge model: {exc}") from exc
