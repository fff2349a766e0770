"""The typed schema of a run: frozen dataclasses, one per config group.

Every default carries its source in the comment beside it; ``conf/`` repeats them so
that ``--cfg job`` shows a complete run, and ``tests/test_config.py`` keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

@dataclass(frozen=True)
class AugmentConfig:
    """Label-preserving augmentation used to expand the embedded digits."""

    rotate_deg: float = 10.0  # small affine jitter (issue #2); +-10 deg keeps 6/9 apart
    scale: float = 0.1  # relative zoom jitter, +-10 %
    translate_px: float = 2.0  # shift at 32x32, +-2 px
    stroke_px: int = 1  # stroke width change: dilation/erosion radius up to this


@dataclass(frozen=True)
class PartitionConfig:
    """How the edge part is split over devices (ECLM section 7.1)."""

    kind: str = "label_skew"  # label_skew | dirichlet | iid
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
    proxy_samples: int = 3000  # augmented proxy samples the cloud pre-trains on
    global_test_samples: int = 1000  # augmented renders of the test originals (cloud test set)
    cache_dir: str = "~/.cache/edgecloud"  # device partitions cached here (experiments/data/partition_cache.py); "" = none
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass(frozen=True)
class ScenarioConfig:
    """Dynamics of the edge environment: time slots (ECLM 2.1, 7.3) and online streams (CEMA)."""

    name: str = "one_step"
    replace_fraction: float = 0.0  # ECLM 2.1: 0.2 per slot; 7.3: 0.5 per slot
    slot_rounds: int = 1  # rounds per time slot
    corruptions: tuple[str, ...] = ()  # domain of each slot's new data, cycled; () = clean
    severity: int = 3  # corruption severity 1-5 (CIFAR-10-C recipe)
    # Online test-time stream (CEMA setting, experiments/data/online.py):
    per_device_domains: bool = False  # False: every device sees corruptions in order; True: a seeded permutation per device
    stream_batch: int = 64  # CEMA: test batches of 64 (ALGORITHMS.md)
    batches_per_domain: int = 10  # online batches per domain before the next (assumption: sized for CPU runs)


@dataclass(frozen=True)
class FleetConfig:
    """Size of the simulated fleet and how device budgets are drawn."""

    devices: int = 100  # ARCHITECTURE.md: default run simulates 100 devices
    per_round: int = 10  # cohort size per round
    mix: Mapping[str, float] = field(default_factory=dict)  # device class -> weight; {} = uniform
    load_max: float = 5.0  # ECLM Fig. 1b: co-running apps slow training up to ~5x
    load_prob: float = 0.3  # chance that a device has co-running apps in a round
    availability_min: float = 0.9  # per-device probability of answering a round
    availability_max: float = 1.0
    deadline_s: float | None = None  # drop stragglers slower than this (virtual seconds)


@dataclass(frozen=True)
class ModelConfig:
    """The network the cloud pre-trains and devices adapt."""

    name: str = "auto"  # auto: the algorithm's own network (experiments/algorithms/registry.py); or a registered name
    width: int = 16  # channels of the first conv stage / hidden units (cnn: ~24k parameters)
    # Modular families only (ECLM 4.1-4.2); None keeps the family's default (models/eclm/families.py).
    top_k: int | None = None  # modules active per sample and layer
    modules_per_layer: int | None = None  # N (paper: 16, or 32 for VGG16/ResNet34)
    shrink: float | None = None  # inner width of a shrunk module relative to the block
    checkpoint: str | None = None  # state dict file to start from instead of pre-training (required for imagenet_c: no proxy part)


@dataclass(frozen=True)
class EclmOptions:
    """ECLM's own settings (seed 001 sections 4.3, 5.1, 7.5; ALGORITHMS.md)."""

    load_balance_weight: float = 1e-2  # w of the load-balancing loss (Shazeer et al. 2017; ALGORITHMS.md)
    ability_epochs: int = 3  # module ability-enhancing fine-tuning epochs (assumption: paper gives none)
    subtasks: str = "cooccurrence"  # cooccurrence (classes sharing devices, 4.3 step 1) | fixed
    subtask_size: int = 2  # classes per sub-task (label skew m of Table 1)
    kappa1: float | None = None  # module load cap; None = ceil(T * kappa2 / N), balanced (models/eclm/ability.py)
    kappa2: int = 2  # modules per sub-task (assumption: equals top-k)
    kl_weight: float = 1.0  # lambda of CE + lambda * KL(g, g_label) (assumption)
    ability_load_balance: bool = False  # also add the load-balancing term to that loss (not in ECLM 4.3's fine-tuning loss)
    size_cap: float = 0.25  # largest sub-model / cloud model bytes (ECLM 7.5: 20 % sub-models lose little)
    round_budget_s: float = 60.0  # time a round may take on a device, compute and communication
    local_adjust: bool = True  # devices drop modules under co-running load (ECLM 3, 5.1)


@dataclass(frozen=True)
class HeteroflOptions:
    """HeteroFL / FedRolex settings (Diao et al. 2021; Alam et al. 2022)."""

    rates: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)  # HeteroFL sec. 4, levels a-e
    round_budget_s: float | None = None  # None: fleet.deadline_s, else the fleet's median full-model round time
    budget_quantile: float = 0.5  # which device's round time sets the default budget (assumption)
    weight_by_examples: bool = False  # both reference codes average covering clients by count
    global_sbn: bool = True  # evaluate the aggregated full model on devices (HeteroFL 3.2), comparable to FedAvg
    multirate_epochs: int = 2  # cloud passes over every width so the pre-trained model can be cut (assumption)
    label_split: bool = True  # classifier rows averaged over the devices holding the class (HeteroFL/FedRolex combine)
    label_mask: bool = True  # mask absent classes' logits in local training and test (official `mask: '1'`)
    clip_grad_norm: float | None = 1.0  # local gradient-norm clip (HeteroFL Local.train, FedRolex client step)


@dataclass(frozen=True)
class CemaOptions:
    """CEMA's own settings (seed 000; ALGORITHMS.md, official code chenyaofo/CEMA)."""

    foundation_model: str = "resnet18"  # the cloud's bigger network, pre-trained on the proxy part
    foundation_width: int = 16  # its width (narrow CPU variant; the poster uses ResNet-50/101)
    foundation_checkpoint: str | None = None  # its state dict file instead of pre-training (required for imagenet_c)
    send: str = "bn"  # bn: BN affine + running statistics back to devices (official code) | full
    replay_capacity: int = 10_000  # FIFO replay buffer (official conf/cema.conf replay_buffer_size)
    e_max: float = 0.4  # E_max^0 = e_max * ln C, also the cloud's loss reference (official conf ent_high_margin)
    e_min: float | None = 0.02  # E_min = e_min * ln C, the setting behind the poster's upload figures (official tools/results.txt); None: no lower bound (conf/cema.conf)
    threshold_coeff: float = 1.0  # lambda of the dynamic E_max rule (official tools/results.txt; conf/cema.conf 0.6, unused without warm-up)
    warmup_samples: int | None = 640  # samples before the dynamic rule starts (assumption: 10 batches of 64, none published); None: never (conf/cema.conf)
    d_margin: float | None = None  # redundancy margin on |cos|; None: 0.4 CIFAR-10 family, 0.1 CIFAR-100, 0.05 ImageNet (experiments/algorithms/cema.py)
    tbr: bool = True  # BN: Test-time Batch Renormalization (official conf is_tbr: true) | false: batch statistics
    edge_models: str = "shared"  # shared: one edge model for the fleet | per_device: one per device
    edge_bn: str | None = None  # edge prediction's BN: None = as tbr (official infer) | batch | running (plain eval mode)


@dataclass(frozen=True)
class ElasticOptions:
    """ElasticDNN's own settings (seed 003, III-B and IV; ALGORITHMS.md; models/elastic/remodel.py)."""

    method: str = "elasticdnn"  # elasticdnn | source | bn_adapt | tent | shot (same size) | full (whole master)
    keep_fraction: float = 0.2  # surrogate / pruned-baseline share of filters (IV: 80 % of filters removed)
    mass: float = 0.8  # trained filters cover this share of the BN-gradient scores (III-B)
    loss: str = "im"  # im (information maximisation, III-B default) | tent | feature_alignment
    epochs: int = 20  # passes over the domain's 100 samples (searched, python -m experiments.claims.elastic_tune; docs/RESULTS.md)
    lr: float = 1e-3  # SGD (searched as the paper's benchmark does, IV; SHOT's digit code: 1e-2 on thousands of samples)
    batch_size: int = 64  # SHOT digit code
    compress_epochs: int = 5  # same-size baselines: proxy fine-tuning of the pruned master (IV: compressed offline); 0 = none
    master_update: bool = True  # write surrogates' changes back (III-B3, eq. 3-4); false = the paper's ablation (IV)
    write_back_bn: bool = False  # also copy the kept filters' BN gamma/beta into the master; eq. 1-4 cover conv filters only (docs/RESULTS.md)
    sandwich: str = "both"  # master pre-training: both = also the full master and the smallest share every step (sandwich rule, models/elastic/pretrain.py) | largest | none
    bank_fedavg: bool = False  # extension beyond the paper: the cloud averages the devices' banks every round
    shot_labels: str = "eval"  # method=shot: pseudo-labels from running statistics (tim-learn/SHOT train_target: netF.eval() before obtain_label) | batch


@dataclass(frozen=True)
class BnAdaptOptions:
    """BN adaptation (models/tta/norm.py)."""

    stats: str = "mixed"  # mixed: (1 - m) source + m batch statistics (chenyaofo/CEMA BNAdaptation) | batch (Tent norm.py)
    momentum: float = 0.5  # m of the mixed statistics (chenyaofo/CEMA conf/bn_adapt.conf)


@dataclass(frozen=True)
class OndaOptions:
    """ONDA: BN running statistics as a moving average of the test batches (models/tta/norm.py)."""

    momentum: float = 0.1  # weight of each new batch (chenyaofo/CEMA conf/tema.conf)
    update: str = "layerwise"  # layerwise: fold, then normalise, per layer (CEMA TEMA) | two_pass (test-time-adaptation EMABatchNorm)


@dataclass(frozen=True)
class PlOptions:
    """Pseudo-labelling (models/tta/methods.py); one reference setting for every dataset."""

    threshold: float = 0.0  # keep samples whose max softmax exceeds it; 0: every argmax (CEMA pl.py; fiveai/LAME: 0.9)
    optimizer: str = "sgd"  # adam | sgd | nesterov (CEMA pl.py: SGD momentum 0.9)
    lr: float = 1e-3  # CEMA conf/pl.conf tta_lr


@dataclass(frozen=True)
class TentOptions:
    """Tent (models/tta/methods.py); None: the dataset family's reference value (models/tta/settings.py)."""

    optimizer: str | None = None  # adam | sgd | nesterov; None: CIFAR adam (Tent cfgs/tent.yaml), ImageNet sgd (EATA main.py)
    lr: float | None = None  # None: CIFAR 1e-3, ImageNet 2.5e-4 (same sources)


@dataclass(frozen=True)
class EtaOptions:
    """ETA and eta_upload (models/tta/methods.py); None: the dataset family's reference value."""

    optimizer: str | None = None  # None: CIFAR adam (test-time-adaptation cfgs/cifar10_c/eta.yaml), ImageNet sgd (EATA main.py)
    lr: float | None = None  # None: CIFAR 1e-3, ImageNet 2.5e-4 (same sources)
    d_margin: float | None = None  # redundancy margin on |cos|; None: CIFAR-10 0.4, CIFAR-100 0.1, ImageNet 0.05
    entropy_fraction: float = 0.4  # E0 = entropy_fraction * ln C (EATA main.py --e_margin)


@dataclass(frozen=True)
class CottaOptions:
    """CoTTA (models/tta/cotta.py); None: the dataset family's reference value (qinenergy/cotta configs)."""

    optimizer: str | None = None  # None: CIFAR adam, ImageNet nesterov (SGD momentum 0.9)
    lr: float | None = None  # None: CIFAR 1e-3, ImageNet 0.01
    restore_prob: float | None = None  # stochastic restore; None: CIFAR 0.01, ImageNet 0.001
    anchor_threshold: float | None = None  # augment below it; None: CIFAR-10 0.92, CIFAR-100 0.72, ImageNet 0.1
    loss: str | None = None  # ce | symmetric; None: CIFAR ce, ImageNet symmetric
    ema: float = 0.999  # teacher EMA (both configurations)
    augmentations: int = 32  # augmented copies averaged (both configurations)


@dataclass(frozen=True)
class LameOptions:
    """LAME (models/tta/lame.py)."""

    affinity: str = "knn"  # knn | rbf | linear (CEMA conf/lame.conf and lame.py: knn; fiveai/LAME defaults.py: rbf)
    knn: int = 5  # fiveai/LAME overall_best.yaml LAME_KNN


@dataclass(frozen=True)
class TtaOptions:
    """The on-device TTA baselines' settings, one group per adapter (eta_upload uses eta's)."""

    bn_adapt: BnAdaptOptions = field(default_factory=BnAdaptOptions)
    onda: OndaOptions = field(default_factory=OndaOptions)
    pl: PlOptions = field(default_factory=PlOptions)
    tent: TentOptions = field(default_factory=TentOptions)
    eta: EtaOptions = field(default_factory=EtaOptions)
    cotta: CottaOptions = field(default_factory=CottaOptions)
    lame: LameOptions = field(default_factory=LameOptions)


@dataclass(frozen=True)
class AlgorithmConfig:
    """The adaptation algorithm and its local-training settings."""

    name: str = "eclm"  # registered in experiments/algorithms/registry.py; ECLM is the project's default
    local_epochs: int = 3  # ECLM 7.1: 3 local epochs per round
    lr: float = 1e-3  # ECLM 7.1
    batch_size: int = 16  # ECLM 7.1
    optimizer: str = "adam"  # sgd | adam; ECLM does not name it, Adam suits lr 1e-3
    momentum: float = 0.9  # for sgd
    eclm: EclmOptions = field(default_factory=EclmOptions)
    heterofl: HeteroflOptions = field(default_factory=HeteroflOptions)
    cema: CemaOptions = field(default_factory=CemaOptions)
    elasticdnn: ElasticOptions = field(default_factory=ElasticOptions)
    tta: TtaOptions = field(default_factory=TtaOptions)


@dataclass(frozen=True)
class PretrainConfig:
    """Cloud pre-training on the proxy part, cached on disk by config hash."""

    epochs: int = 10  # converges the default CNN on the digits proxy part (test acc ~0.97)
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
    """Injected faults (issue 6): devices that misbehave, a ServerApp that crashes; off by default.

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
    rounds: int = 10
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
