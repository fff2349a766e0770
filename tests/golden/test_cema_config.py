"""Every ``algorithm.cema`` key: validation and the code that uses it accept and reject the same values."""

import math

import numpy as np
import pytest
import torch

from clients.cema import FILTER_OPTIONS, edge_logits
from experiments.algorithms import cema as cema_setup
from experiments.config import from_dict
from experiments.schema import ConfigError
from models.catalog import build_model
from models.cema.cloud import ReplayBuffer
from models.cema.filter import UploadFilter
from strategies.cema import CEMA


def _cfg(dataset="digits", **cema):
    raw = {"algorithm": {"name": "cema", "cema": cema}, "dataset": {"name": dataset}, "scenario": {"name": "online"}}
    return from_dict(raw)


def _filter(cfg, num_classes=10):
    options = cema_setup.client_options(cfg)
    return UploadFilter(num_classes, **{key: options[key] for key in FILTER_OPTIONS if key in options})


def _cnn():
    return build_model("cnn", num_classes=10, width=4)


def _strategy(**kwargs):
    torch.manual_seed(0)
    args = dict(foundation=_cnn(), edge_factory=_cnn, preprocess=lambda p: torch.zeros(0), num_classes=10,
                per_round=1, seed=0, expected_devices=1)
    return CEMA(**{**args, **kwargs})


def test_defaults_are_the_published_setting_and_devices_accept_them():
    cfg = _cfg()
    cema = cfg.algorithm.options
    # official tools/results.txt "E_min=0.02, lambda=1.0"; is_tbr: true (conf/cema.conf); warm-up ours
    assert (cema.e_max, cema.e_min, cema.threshold_coeff, cema.warmup_samples, cema.tbr) == (0.4, 0.02, 1.0, 640, True)
    f = _filter(cfg)
    assert f.warmup_samples == 640 and f.cosine_margin == 0.4  # digits: the CIFAR family


@pytest.mark.parametrize(("dataset", "margin"), [("digits", 0.4), ("cifar10", 0.4), ("cifar100", 0.1)])
def test_d_margin_null_follows_the_reference_family(dataset, margin):
    assert cema_setup.d_margin(_cfg(dataset)) == margin


def test_d_margin_for_imagenet_and_an_explicit_value():
    assert cema_setup.D_MARGIN_BY_FAMILY["imagenet"] == 0.05  # chenyaofo/CEMA conf/cema.conf, EATA main.py
    assert cema_setup.d_margin(_cfg(d_margin=0.7)) == 0.7
    assert _filter(_cfg(d_margin=0.7)).cosine_margin == 0.7


# key, a value validation must reject, how the code rejects the same value (None: config-only key)
REJECTED = [
    ("foundation_model", "resnet1000", None),
    ("foundation_width", 0, None),
    ("send", "all", lambda v: _strategy(send=v)),
    ("replay_capacity", 0, lambda v: ReplayBuffer(v)),
    ("e_max", 0.0, lambda v: UploadFilter(10, e_max_fraction=v)),
    ("e_max", 1.5, lambda v: _strategy(e_max_fraction=v)),
    ("e_min", -0.1, lambda v: UploadFilter(10, e_min_fraction=v)),
    ("e_min", 0.4, lambda v: UploadFilter(10, e_min_fraction=v)),  # not below e_max = 0.4
    ("threshold_coeff", 0.0, lambda v: UploadFilter(10, threshold_coeff=v)),
    ("warmup_samples", 0, lambda v: UploadFilter(10, warmup_samples=v)),
    ("d_margin", 0.0, lambda v: UploadFilter(10, cosine_margin=v)),
    ("edge_models", "each", lambda v: _strategy(edge_models=v)),
    ("edge_bn", "eval", lambda v: edge_logits(_cnn(), torch.zeros(2, 3, 32, 32), True, v)),
]


@pytest.mark.parametrize(("key", "value", "code"), REJECTED, ids=[f"{k}={v}" for k, v, _ in REJECTED])
def test_validation_and_code_reject_the_same_value(key, value, code):
    with pytest.raises(ConfigError, match=f"algorithm.cema.{key}"):
        _cfg(**{key: value})
    if code is not None:
        with pytest.raises(ValueError):
            code(value)


ACCEPTED = [("e_min", None), ("e_min", 0.0), ("e_min", 0.39), ("e_max", 1.0), ("warmup_samples", 1),
            ("warmup_samples", None), ("d_margin", 1.5), ("threshold_coeff", 1.0), ("edge_bn", "running"),
            ("edge_bn", "batch"), ("tbr", False)]


@pytest.mark.parametrize(("key", "value"), ACCEPTED, ids=[f"{k}={v}" for k, v in ACCEPTED])
def test_boundary_values_pass_validation_and_reach_a_working_device(key, value):
    cfg = _cfg(**{key: value})
    f = _filter(cfg)
    f.select(torch.from_numpy(np.random.default_rng(0).normal(size=(8, 10))).float())
    options = cema_setup.client_options(cfg)
    model = build_model("cnn", num_classes=10, width=4)
    assert edge_logits(model, torch.zeros(2, 3, 32, 32), options["tbr"], options["edge_bn"]).shape == (2, 10)
    if key == "e_max":
        assert _strategy(e_max_fraction=value).e0 == pytest.approx(value * math.log(10))


def test_tbr_must_be_a_boolean():
    with pytest.raises(ConfigError, match="algorithm.cema.tbr"):
        _cfg(tbr="maybe")
    assert cema_setup.client_options(_cfg(tbr=False))["tbr"] is False
