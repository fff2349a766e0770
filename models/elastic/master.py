"""ElasticDNN's master DNN and its domain-knowledge bank as ONE network (seed 003, III-A).

The cloud pre-trains both together and ships them to a device in one state dict; the device
keeps both, remodels surrogates from the master and writes what it learned back through the
bank (eq. 3-4). Inference with the pair is inference with the master.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.elastic.bank import DomainKnowledgeBank, build_bank
from models.elastic.fbs_resnet import FBSResNet, fbs_resnet56, fbs_resnet_cpu
from models.registry import register_model

#: Seed of the relevance matrices' noise when none is given (models.elastic.bank.build_bank default).
BANK_SEED = 0


class ElasticMaster(nn.Module):
    """A gated master DNN (``.master``) and its domain-knowledge bank (``.bank``).

    Parameters
    ----------
    master : FBSResNet
        The FBS-gated network.
    bank : DomainKnowledgeBank
        Its bank, built from ``master`` (:func:`models.elastic.bank.build_bank`).
    """

    def __init__(self, master: FBSResNet, bank: DomainKnowledgeBank) -> None:
        super().__init__()
        self.master = master
        self.bank = bank

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.master(x)


def _with_bank(master: FBSResNet, seed: int | None) -> ElasticMaster:
    return ElasticMaster(master, build_bank(master, seed=BANK_SEED if seed is None else seed))


@register_model("elastic_fbs_resnet_cpu")
def elastic_fbs_resnet_cpu(num_classes: int, width: int, in_channels: int = 3, gate_hidden: int | None = None,
                           seed: int | None = None) -> ElasticMaster:
    """The narrow CPU master (``fbs_resnet_cpu``, a gated ResNet14) with its bank."""
    return _with_bank(fbs_resnet_cpu(num_classes, width, in_channels, gate_hidden=gate_hidden, seed=seed), seed)


@register_model("elastic_fbs_resnet56")
def elastic_fbs_resnet56(num_classes: int, width: int, in_channels: int = 3, gate_hidden: int | None = None,
                         seed: int | None = None) -> ElasticMaster:
    """The paper's ResNet56 master (``fbs_resnet56``) with its bank."""
    return _with_bank(fbs_resnet56(num_classes, width, in_channels, gate_hidden=gate_hidden, seed=seed), seed)
