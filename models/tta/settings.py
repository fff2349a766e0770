"""The reference hyper-parameters of the on-device TTA baselines, per dataset family.

The official code of each method ships one configuration for the small 32x32 benchmarks
(CIFAR-10-C, CIFAR-100-C) and another for ImageNet-C, and they differ: Tent's and ETA's optimiser
and step size, EATA's redundancy margin, CoTTA's optimiser, loss, anchor threshold and restore
probability. A run's ``algorithm.<method>.<key>: null`` takes the value below for its
dataset's family (:func:`resolve`); CIFAR-100 refines two CIFAR values. Settings that are the
same in every configuration are module constants of the method's own module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The CIFAR-10-C / CIFAR-100-C configurations of the reference code (``experiments.data.reference_family``
#: names the family of each dataset; restated here because ``models`` imports nothing of ``experiments``).
CIFAR = "cifar"
#: The ImageNet-C configurations of the reference code.
IMAGENET = "imagenet"
FAMILIES = (CIFAR, IMAGENET)
#: The family an adapter built without one follows (the project's default dataset, digits, is CIFAR-like).
DEFAULT_FAMILY = CIFAR

#: Adam, betas (0.9, 0.999), no weight decay (DequanWang/tent ``cifar10c.py`` ``setup_optimizer``).
ADAM = "adam"
#: SGD, momentum 0.9 (mr-eggplant/EATA ``main.py``: ``SGD(params, 0.00025, momentum=0.9)``).
SGD = "sgd"
#: SGD, momentum 0.9, Nesterov (qinenergy/cotta ``imagenet/conf.py``: ``OPTIM.NESTEROV = True``).
NESTEROV = "nesterov"
OPTIMIZERS = (ADAM, SGD, NESTEROV)

#: CoTTA's consistency loss: cross-entropy of the student to the teacher (qinenergy/cotta ``cifar/cotta.py``).
CROSS_ENTROPY = "ce"
#: CoTTA's symmetric cross-entropy, half each way (qinenergy/cotta ``imagenet/cotta.py`` ``softmax_entropy``).
SYMMETRIC = "symmetric"
COTTA_LOSSES = (CROSS_ENTROPY, SYMMETRIC)

#: Per method and family: the values of the keys whose reference value depends on the dataset.
REFERENCE: dict[str, dict[str, dict[str, Any]]] = {
    # CIFAR: DequanWang/tent cfgs/tent.yaml (Adam, LR 1e-3, batch 200). ImageNet: SGD lr 2.5e-4,
    # momentum 0.9, batch 64 (Tent paper sec. 4; mr-eggplant/EATA main.py for --algorithm tent).
    "tent": {CIFAR: {"optimizer": ADAM, "lr": 1e-3}, IMAGENET: {"optimizer": SGD, "lr": 2.5e-4}},
    # CIFAR: mariodoebler/test-time-adaptation classification/cfgs/cifar10_c/eta.yaml (Adam, LR 1e-3,
    # D_MARGIN 0.4; the official EATA repository ships ImageNet settings only). ImageNet:
    # mr-eggplant/EATA main.py (SGD lr 2.5e-4 momentum 0.9, --d_margin 0.05).
    "eta": {CIFAR: {"optimizer": ADAM, "lr": 1e-3, "d_margin": 0.4},
            IMAGENET: {"optimizer": SGD, "lr": 2.5e-4, "d_margin": 0.05}},
    # CIFAR: qinenergy/cotta cifar/cfgs/cifar10/cotta.yaml (Adam LR 1e-3, RST 0.01, AP 0.92) and
    # cifar/cotta.py (cross-entropy). ImageNet: imagenet/cfgs/10orders/cotta/*.yaml (SGD LR 0.01,
    # Nesterov by imagenet/conf.py) and imagenet/cotta.py (restore 0.001, anchor 0.1, symmetric loss).
    "cotta": {CIFAR: {"optimizer": ADAM, "lr": 1e-3, "restore_prob": 0.01, "anchor_threshold": 0.92,
                      "loss": CROSS_ENTROPY},
              IMAGENET: {"optimizer": NESTEROV, "lr": 0.01, "restore_prob": 0.001, "anchor_threshold": 0.1,
                         "loss": SYMMETRIC}},
}
#: Per method and dataset: refinements of the family's values.
BY_DATASET: dict[str, dict[str, dict[str, Any]]] = {
    # mariodoebler/test-time-adaptation classification/cfgs/cifar100_c/eta.yaml: D_MARGIN 0.1.
    "eta": {"cifar100": {"d_margin": 0.1}},
    # qinenergy/cotta cifar/cfgs/cifar100/cotta.yaml: AP 0.72.
    "cotta": {"cifar100": {"anchor_threshold": 0.72}},
}


def reference_values(method: str, family: str, dataset: str | None = None) -> dict[str, Any]:
    """The dataset-dependent reference values of ``method`` (``{}`` for a method without any).

    Parameters
    ----------
    method : str
        An adapter name of :mod:`models.tta.registry` (e.g. ``"cotta"``).
    family : str
        :data:`CIFAR` or :data:`IMAGENET`.
    dataset : str, optional
        The dataset's name, for the refinements of :data:`BY_DATASET`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown reference family {family!r}; choose one of {FAMILIES}")
    values = dict(REFERENCE.get(method, {}).get(family, {}))
    values.update(BY_DATASET.get(method, {}).get(dataset, {}))
    return values


def resolve(method: str, family: str, dataset: str | None, configured: Mapping[str, Any]) -> dict[str, Any]:
    """``configured`` with every ``None`` replaced by the reference value for the family and dataset.

    Parameters
    ----------
    method, family, dataset
        As in :func:`reference_values`.
    configured : mapping
        Keyword hyper-parameters of the adapter, ``None`` where the reference decides
        (``algorithm.<method>`` of a run).

    Raises
    ------
    ValueError
        A ``None`` for a key that has no reference value.
    """
    reference = reference_values(method, family, dataset)
    resolved = {}
    for key, value in configured.items():
        if value is None:
            if key not in reference:
                raise ValueError(f"algorithm.{method}.{key} is null but no reference configuration "
                                 f"sets it; give it a value (reference keys: {sorted(reference)})")
            value = reference[key]
        resolved[key] = value
    return resolved
