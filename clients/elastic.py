"""ElasticDNN's edge: remodel the master into a domain's surrogate, adapt it, learn back (seed 003).

Each round brings the device a new target domain of its evolving sequence: two consecutive
batches of its stream from the same domain, the first unlabeled batch to adapt on (paper:
100 samples per domain), the second held out to measure accuracy after adaptation (the
labels are known to the simulator only). The master and its domain-knowledge bank live in
``context.state`` (a few hundred KB for the CPU master; the full ResNet56 pair is ~8 MB),
so a later domain's surrogate starts from the master every earlier domain updated.

``Device.options["method"]`` picks ElasticDNN or a comparison method at the same model size
(:data:`models.elastic.remodel.METHODS`): the baselines adapt a same-size model continually
across domains -- the cloud's compressed model (the master's largest filters, fine-tuned on the
source data) when the first message carries it under ``compressed``, else the master's
magnitude-pruned copy as it is; ``full`` retrains the whole master (the slow reference).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn

from clients.base import Device, MalformedMessage, load_arrays, model_from, round_of
from clients.online import OnlineClient
from clients.protocol import ARRAYS_RECORD, COMPUTE_TIME_KEY, CONFIG_RECORD, PARTITION_KEY
from models.clock import compute_time_s
from models.elastic.accounting import FLOPS_KEY, adapt_and_account
from models.elastic.bank import bank_thetas, load_bank_thetas
from models.elastic.master import ElasticMaster
from models.elastic.remodel import METHODS, PRUNED_METHODS, RemodelSettings, pruned_model

#: Batches of its stream a device uses per domain: one to adapt on, one to evaluate.
BATCHES_PER_ROUND = 2
#: Array record of the cloud's compressed same-size model (a device's first message, optional).
COMPRESSED_KEY = "compressed"
#: Array record of a bank's ``theta*`` by layer: the fleet's average in, the device's own out
#: (``algorithm.elasticdnn.bank_fedavg``; the round config then says ``share_bank``).
BANK_KEY = "bank"
#: Config entry asking the device to send its bank back.
SHARE_BANK_KEY = "share_bank"
#: ``Device.options`` keys that become :class:`RemodelSettings` fields.
SETTING_KEYS = ("keep_fraction", "mass", "loss", "epochs", "lr", "batch_size", "master_update", "write_back_bn",
                "shot_labels")


class ElasticClient(OnlineClient):
    """ElasticDNN (or a same-size baseline) on the device's evolving domains, one domain a round.

    The first message must carry the pre-trained master and bank in ``arrays`` (and, for a
    same-size baseline, may carry the compressed model in ``compressed``); later ones need
    only the ``config`` record. A ``bank`` record (the fleet's averaged ``theta*``) is adopted
    before the domain; with ``share_bank`` in the config the reply carries the device's own. Reply metrics: ``accuracy``/``correct`` after adaptation
    on the held-out batch, ``accuracy_before`` (the model that would have served the domain
    unadapted), ``adapt_wall_s``, ``adapt_flops`` (the FLOPs of the work the adaptation ran, counted
    by torch: :func:`models.elastic.accounting.adapt_and_account`), ``compute_time_s`` (virtual:
    those FLOPs on the device class, :func:`models.clock.compute_time_s`), the memory the method
    kept (``resident_memory_bytes``, ``peak_memory_bytes`` and every part,
    :class:`models.elastic.footprint.MemoryFootprint`), ``model_fraction`` (conv weights of the
    serving model / master's) and ``trained_fraction``.

    Parameters
    ----------
    device : Device
        The device; it needs a ``stream`` and ``options["method"]`` in :data:`METHODS`.
    """

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        method = device.options.get("method", "elasticdnn")
        if method not in METHODS:
            raise ValueError(f"Device.options['method'] is {method!r}; choose one of {METHODS}")
        self.method = method
        self.settings = RemodelSettings(**{k: device.options[k] for k in SETTING_KEYS if k in device.options})

    def train(self, msg: Message, context: Context) -> Message:
        """Adapt to the next domain, evaluate on its held-out batch, keep the updated state."""
        server_round = round_of(msg)
        self.restore_progress(context, server_round)  # after a resumed run's restart
        if self.device.stream is None:
            raise MalformedMessage("this device has no stream of domains (use scenario=evolving)")
        index = self.stream_index(context)
        adapt, held_out = self.device.stream(index), self.device.stream(index + 1)
        if adapt.domain != held_out.domain:
            raise MalformedMessage(f"batches {index} and {index + 1} come from different domains "
                                   f"({adapt.domain}, {held_out.domain}); use an even scenario.batches_per_domain")
        elastic, small = self._restore(msg, context)
        if BANK_KEY in msg.content.array_records:
            adopt_fleet_bank(elastic, msg)
        seed = self.device.seed + server_round
        serving, report = adapt_and_account(self.method, elastic, small, adapt.x, self.settings, seed)
        before = report.pop("before")
        with torch.no_grad():
            logits = _eval(serving, held_out.x)
            accuracy_before = int((_eval(before, held_out.x).argmax(1) == held_out.y).sum()) / len(held_out.y)
        self.keep_progress(context, server_round, index + BATCHES_PER_ROUND, {"elastic": elastic, "small": small})
        load = self.device.load_factor(server_round)
        metrics = {
            **report,
            "accuracy_before": accuracy_before,
            COMPUTE_TIME_KEY: compute_time_s(report[FLOPS_KEY], float(self.device.budget["flops_per_s"]), load),
            "load_factor": load,
            PARTITION_KEY: self.device.partition_id,
        }
        reply = self.batch_reply(msg, held_out, logits, metrics)
        if msg.content[CONFIG_RECORD].get(SHARE_BANK_KEY, False):
            reply.content[BANK_KEY] = ArrayRecord(bank_thetas(elastic.bank))
        return reply

    def _restore(self, msg: Message, context: Context) -> tuple[ElasticMaster, nn.Module | None]:
        """The master/bank (and the baselines' pruned model) as after the previous domain."""
        saved = self.load_blob(context)
        if saved is not None:
            return saved["elastic"], saved["small"]
        if ARRAYS_RECORD not in msg.content.array_records:
            raise MalformedMessage(
                f"the device's first ElasticDNN message must carry the master and bank in {ARRAYS_RECORD!r}"
            )
        elastic = model_from(msg, self.device)
        if not isinstance(elastic, ElasticMaster):
            raise MalformedMessage(f"ElasticDNN needs an ElasticMaster network, the device builds {type(elastic).__name__}")
        small = None
        if self.method in PRUNED_METHODS:
            small = pruned_model(elastic, self.settings.keep_fraction)
            if COMPRESSED_KEY in msg.content.array_records:  # the cloud's fine-tuned compressed model
                load_arrays(small, msg, COMPRESSED_KEY)
        return elastic, small


def adopt_fleet_bank(elastic: ElasticMaster, msg: Message) -> None:
    """Take the fleet's averaged ``theta*`` and rebuild the master from it (eq. 4); MalformedMessage if it does not fit."""
    try:
        thetas = msg.content.array_records[BANK_KEY].to_torch_state_dict()
        load_bank_thetas(elastic.master, elastic.bank, thetas)
    except (ValueError, TypeError, KeyError) as exc:
        raise MalformedMessage(f"array record {BANK_KEY!r} does not fit the device's bank: {exc}") from exc


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` in evaluation mode (running BN statistics), mode restored."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)
