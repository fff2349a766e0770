"""The data room's checks of a run's settings: known dataset and corruption names, ImageNet-C's needs.

Run by :func:`experiments.config.from_dict` before anything is loaded, so a bad name or a
missing folder fails with one message naming the key and the fix.
"""

from __future__ import annotations

from experiments.data.imagenet_c import check_layout, check_scenario
from experiments.schema import ConfigError, RunConfig

#: Datasets a run can name (conf/dataset/).
DATASETS = ("digits", "cifar10", "cifar100", "imagenet_c")
#: The dataset served from a folder of ImageNet-C, with no proxy part to pre-train on.
IMAGENET_C = "imagenet_c"


def check_data_settings(cfg: RunConfig) -> None:
    """Reject an unknown dataset or corruption name, and ImageNet-C settings it cannot serve."""
    if cfg.dataset.name not in DATASETS:
        raise ConfigError(f"dataset.name must be one of {DATASETS}, got {cfg.dataset.name!r}")
    if cfg.dataset.name == IMAGENET_C:
        check_imagenet_c(cfg)
    if cfg.scenario.corruptions:
        check_corruption_names(cfg.scenario.corruptions)


def check_corruption_names(names: tuple[str, ...]) -> None:
    """Every name is one of the 15 corruptions (the module, and the scipy it needs, load only here)."""
    from experiments.data.corruptions import CORRUPTIONS  # scipy's import costs start-up: only when named

    for name in names:
        if name not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {name!r} in scenario.corruptions; choose from {list(CORRUPTIONS)}")


def check_imagenet_c(cfg: RunConfig) -> None:
    """ImageNet-C: the online scenario, its folders on disk, and the edge network's checkpoint.

    There is no proxy part to pre-train on, so the edge (source) network must come from a
    state dict file the user provides (an algorithm with a network of its own checks its own).
    """
    check_scenario(cfg.scenario)
    if cfg.dataset.download:
        raise ConfigError("dataset.download must be false for imagenet_c (it is never fetched; "
                          "point dataset.root at your copy)")
    check_layout(cfg.dataset.root, cfg.scenario.corruptions, cfg.scenario.severity)
    if cfg.model.checkpoint is None:
        raise ConfigError(f"model.checkpoint is null: ImageNet-C has no proxy part to pre-train on; set it to a "
                          f"torchvision state dict file of {cfg.model.name} (the edge / source network)")
