"""Which of a reference implementation's per-dataset configurations applies to a run's dataset.

Official test-time-adaptation code ships one configuration for small 32x32 benchmarks
(CIFAR-10-C / CIFAR-100-C) and another for ImageNet-C, and their settings differ (EATA's
redundancy margin, CoTTA's anchor threshold and optimiser, ...). The embedded digits are
10 classes rendered at 32x32, so they take the CIFAR configuration.
"""

from __future__ import annotations

#: The CIFAR-10-C / CIFAR-100-C configurations of the reference code.
CIFAR = "cifar"
#: The ImageNet-C configurations of the reference code.
IMAGENET = "imagenet"
#: Dataset name -> the reference configuration it follows.
FAMILY_OF_DATASET = {"digits": CIFAR, "cifar10": CIFAR, "cifar100": CIFAR, "imagenet_c": IMAGENET}


def reference_family(dataset: str) -> str:
    """:data:`CIFAR` or :data:`IMAGENET` for a dataset name of ``conf/dataset/``.

    Raises
    ------
    ValueError
        For a dataset this table does not know (add it to :data:`FAMILY_OF_DATASET`).
    """
    try:
        return FAMILY_OF_DATASET[dataset]
    except KeyError:
        raise ValueError(
            f"dataset {dataset!r} has no reference configuration family; add it to FAMILY_OF_DATASET "
            f"(one of {sorted(set(FAMILY_OF_DATASET.values()))})"
        ) from None
