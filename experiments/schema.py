"""The typed schema of a run: frozen dataclasses, one per config group; the bottom of the config layer.

Every default carries its source in the comment beside it; ``conf/`` repeats them so
that ``--cfg job`` shows a complete run, and ``tests/test_config.py`` keeps the two equal.
An algorithm's own settings are its plug-in's dataclass (:mod:`experiments.algorithms`),
held in ``AlgorithmConfig.options``. This module also turns a config into plain data
(:func:`to_dict`, the ``config`` of results.json) and into a cache key (:func:`config_hash`);
it imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the key and the fix."""


#: Field metadata of a value the config layer builds from other keys, not from a key of its own.
PLUGIN_BUILT = "plugin_built"


@dataclass(frozen=True)
class AugmentConfig:
    """Label-preserving augmentation used to expand the embedded digits."""

    rotate_deg: float = 10.0  # small affine jitter ; +-10 deg keeps 6/9 apart
    scale: float = 0.1  # relative zoom jitter, +-10 %
    translate_px: float = 2.0  # shift at 32x32, +-2 px
    stroke_px: int = 1  # stroke width change: dilation/erosion radius up to this


@dataclass(frozen=True)
class PartitionConfig:
    """How the edge part is split over devices (ECLM section 7.1)."""

    kind: str = "auto"  # auto: the scenario's own (scenario.partition) | label_skew | dirichlet | iid
    classes_per_device: int = 2  # ECLM 7.1: each device holds m of n classes (m=2 on CIFAR-10)
    alpha: float = 0.5  # Dirichlet concentration (common non-IID default, Hsu et al. 2019)
    size_min: int = 50  # ECLM 7.1: 50-150 samples per device
    size_max: int = 150
    test_size: int = 30  # local held-out test samples per device, same label mix as its data


@dataclass(frozen=True)
class DatasetConfig:
    """Dataset and its split into cloud proxy, edge and held-out test parts."""

    name: str = "digits"  # digits | cifar10 | cifar100 | imagenet_c (online scenario only, experiments/data/imagenet_c.py)
    root: str | None = None  # folder holding CIFAR files or the ImageNet-C tree (digits needs none)
    download: bool = False  # let torchvision fetch CIFAR into root (never in tests/CI)
    test_fraction: float = 0.2  # originals kept for testing only
    proxy_fraction: float = 0.3  # ECLM 7.2: 30 % of training data is the cloud proxy set
    proxy_samples: int = 1500  # augmented proxy samples the cloud pre-trains on (quick start; the presets pin 3000)
    global_test_samples: int = 1000  # augmented renders of the test originals (cloud test set)
    cache_dir: str = "~/.cache/edgecloud"  # device partitions cached here (experiments/data/partition_cache.py); "" = none
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)


#: The 15 corruptions of CIFAR-10-C (Hendrycks & Dietterich 2019, figure 1 order: noise, blur,
#: weather, digital); experiments/data/corruptions/ renders them.
CORRUPTION_SUITE: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)


@dataclass(frozen=True)
class ScenarioConfig:
    """Dynamics of the edge environment: time slots (ECLM 2.1, 7.3) and online streams (CEMA).

    A named scenario is a file of conf/scenario/. The default, ``auto``, is the algorithm's own
    setting (its plug-in's ``default_scenario``: online streams for CEMA and the TTA baselines,
    evolving domains for ElasticDNN, corrupted edge data for ECLM and its baselines). A value
    left null here comes from the named scenario's file; one given wins over it
    (``scenario.severity=5`` with ``auto`` changes the severity of the algorithm's own setting).
    """

    name: str = "auto"  # auto: the algorithm's own scenario; or a file of conf/scenario/
    replace_fraction: float | None = None  # ECLM 2.1: 0.2 per slot; 7.3: 0.5 per slot
    slot_rounds: int | None = None  # rounds per time slot
    corruptions: tuple[str, ...] | None = None  # domain of each slot's new data, cycled; () = clean
    severity: int | None = None  # corruption severity 1-5 (CIFAR-10-C recipe)
    # Online test-time stream (CEMA setting, experiments/data/online.py):
    per_device_domains: bool | None = None  # False: every device sees corruptions in order; True: a seeded permutation per device
    stream_batch: int | None = None  # samples per stream batch (CEMA: 64, ALGORITHMS.md)
    batches_per_domain: int | None = None  # stream batches per domain before the next
    partition: str | None = None  # how samples reach devices when dataset.partition.kind=auto (label_skew | dirichlet | iid)


@dataclass(frozen=True)
class FleetConfig:
    """Size of the simulated fleet and how device budgets are drawn."""

    devices: int = 100  # ARCHITECTURE.md: default run simulates 100 devices
    per_round: int = 4  # cohort size per round (quick start; ECLM 7.1: 10 of 100, the ECLM preset's)
    mix: Mapping[str, float] = field(default_factory=dict)  # device class -> weight; {} = uniform
    load_max: float = 5.0  # ECLM Fig. 1b: co-running apps slow training up to ~5x
    load_prob: float = 0.3  # chance that a device has co-running apps in a round
    availability_min: float = 0.9  # per-device probability of answering a round
    availability_max: float = 1.0
    deadline_s: float | None = None  # drop stragglers slower than this (virtual seconds)


@dataclass(frozen=True)
class ModelConfig:
    """The network the cloud pre-trains and devices adapt."""

    name: str = "auto"  # auto: the algorithm's own network (its plug-in's default_model); or a registered name
    width: int = 16  # channels of the first conv stage / hidden units (cnn: ~24k parameters)
    # Modular families only (ECLM 4.1-4.2); None keeps the family's default (models/eclm/families.py).
    top_k: int | None = None  # modules active per sample and layer
    modules_per_layer: int | None = None  # N (paper: 16, or 32 for VGG16/ResNet34)
    shrink: float | None = None  # inner width of a shrunk module relative to the block
    checkpoint: str | None = None  # state dict file to start from instead of pre-training (required for imagenet_c: no proxy part)


@dataclass(frozen=True)
class AlgorithmConfig:
    """The adaptation algorithm and its local-training settings."""

    name: str = "eclm"  # a plug-in of experiments/algorithms/; ECLM is the project's default
    local_epochs: int = 3  # ECLM 7.1: 3 local epochs per round
    lr: float = 1e-3  # ECLM 7.1
    batch_size: int = 16  # ECLM 7.1
    optimizer: str = "adam"  # sgd | adam; ECLM does not name it, Adam suits lr 1e-3
    momentum: float = 0.9  # for sgd
    # The algorithm's own settings: its plug-in's options dataclass, built from algorithm.<KEY>
    # by experiments/config.py (never a key of its own: PLUGIN_BUILT).
    options: Any = field(default=None, metadata={PLUGIN_BUILT: True})


@dataclass(frozen=True)
class PretrainConfig:
    """Cloud pre-training on the proxy part, cached on disk by config hash."""

    epochs: int = 6  # quick start (docs/PERFORMANCE.md); the presets pin 10, which converges the CNN on digits
    lr: float = 3e-3  # peak rate of the one-cycle schedule
    batch_size: int = 64
    schedule: str = "onecycle"  # constant | onecycle
    cache_dir: str = "~/.cache/edgecloud"


@dataclass(frozen=True)
class EngineConfig:
    """Flower simulation engine: where ClientApps run, their resources, and guards against hangs."""

    backend: str = "auto"  # auto: processes, or ray with ray_address/num_gpus | ray | processes (docs/PERFORMANCE.md)
    ray_address: str | None = None  # None: start a local Ray; "auto": attach to `ray start --head`
    num_cpus: float = 1.0  # per ClientApp; on 2 cores two actors are fastest
    num_gpus: float = 0.0  # per ClientApp; CPU is the default
    torch_threads: int = 1  # torch threads inside each ClientApp
    round_timeout_s: float = 300.0  # a reply later than this counts as a failure
    verbose: bool = False  # Flower's own INFO logs
    fast_pump: bool = True  # one-pass message pump, 10 ms polls (experiments/engine/fastpath.py); false: Flower's own


@dataclass(frozen=True)
class FaultsConfig:
    """Injected faults: devices that misbehave, a ServerApp that crashes; off by default.

    Each round every device is faulty with probability ``fraction``, drawn from (seed,
    round, partition id) (experiments/fleet/faults.py); a faulty device does one of ``kinds``, drawn
    uniformly from the same generator (repeat a kind to weight it, e.g. [nan, nan, raise]).
    """

    fraction: float = 0.0  # chance that a device misbehaves in a round; 0 = no faults
    kinds: tuple[str, ...] = ("raise",)  # raise | timeout | vanish | wrong_shape | nan_values (experiments/fleet/faults.py)
    actions: tuple[str, ...] = ("train",)  # messages a faulty device mishandles: train | evaluate | query
    crash_server_round: int | None = None  # the ServerApp raises on sending round r (0: discovery); null = never


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; frozen, hashable into a cache key."""

    seed: int = 0
    rounds: int = 4  # the quick start's first run (docs/PERFORMANCE.md); the presets set their own
    output_dir: str | None = None  # where results go; Hydra sets its run dir, None: outputs/<time>
    checkpoint_every: int = 1  # checkpoint the cloud every k rounds and after the last (0: never); 1: cheap on digits
    resume: bool = False  # continue the run in output_dir from its last checkpoint (README, "Resume")
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config (or any of its sections) as plain nested JSON-able data.

    An algorithm's options appear under their block's name (``algorithm.eclm.size_cap``), as
    they are written in ``conf/`` and on the command line.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, AlgorithmConfig):
            fields = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "options"}
            if value.options is not None:
                fields[type(value.options).KEY] = plain(value.options)
            return fields
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (dataclasses or plain data), for cache keys."""
    data = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
