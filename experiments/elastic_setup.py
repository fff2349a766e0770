"""What the apps hand ElasticDNN: the master's pre-training, its cache key, device options."""

from __future__ import annotations

import torch
from torch import nn

from experiments.config import RunConfig
from experiments.validation import ConfigError
from models.elastic_master import ElasticMaster
from models.fbs_pretrain import pretrain_master


def check_model(model: nn.Module) -> None:
    """ElasticDNN remodels an FBS-gated master with a domain-knowledge bank."""
    if not isinstance(model, ElasticMaster):
        raise ConfigError(
            f"algorithm=elasticdnn needs a master with a bank (model=elastic_fbs_resnet_cpu or "
            f"elastic_fbs_resnet56), got {type(model).__name__}; use model=auto"
        )


def cloud_training(cfg: RunConfig, model: ElasticMaster, x: torch.Tensor, y: torch.Tensor, data) -> None:
    """The offline master DNN constructor (III-A): CE + gate L1 + bank loss, random sparsity per step."""
    check_model(model)
    pre = cfg.pretrain
    pretrain_master(model.master, model.bank, x, y, epochs=pre.epochs, lr=pre.lr, batch_size=pre.batch_size,
                    seed=cfg.seed)


def training_key(cfg: RunConfig) -> dict:
    """Pre-training does not depend on the device-side options; the key marks the method."""
    return {"elastic_pretrain": "fbs+bank v2: sandwich, surrogate-shaped masks"}


def client_options(cfg: RunConfig) -> dict:
    """The method and its remodeling settings on every device."""
    opts = cfg.algorithm.elasticdnn
    return {
        "method": opts.method,
        "keep_fraction": opts.keep_fraction,
        "mass": opts.mass,
        "loss": opts.loss,
        "epochs": opts.epochs,
        "lr": opts.lr,
        "batch_size": opts.batch_size,
    }
