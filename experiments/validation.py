"""Semantic checks of a :class:`RunConfig`: impossible values fail with one message naming the key and the fix."""

from __future__ import annotations

from typing import Any

from experiments.schema import EngineConfig, FaultsConfig, RunConfig


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the key and the fix."""


def validate(cfg: RunConfig) -> None:
    """Reject impossible values with one message naming the key and the fix."""
    _check(cfg.seed >= 0, "seed", "must be >= 0", cfg.seed)
    _check(cfg.rounds >= 1, "rounds", "must be >= 1", cfg.rounds)
    _check(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: no checkpoints)", cfg.checkpoint_every)
    fleet = cfg.fleet
    _check(fleet.devices >= 1, "fleet.devices", "must be >= 1", fleet.devices)
    _check(fleet.per_round >= 1, "fleet.per_round", "must be >= 1", fleet.per_round)
    if fleet.per_round > fleet.devices:
        raise ConfigError(
            f"fleet.per_round={fleet.per_round} exceeds fleet.devices={fleet.devices}; "
            "lower fleet.per_round or raise fleet.devices"
        )
    _check(fleet.load_max >= 1.0, "fleet.load_max", "must be >= 1 (a slow-down factor)", fleet.load_max)
    _check(0.0 <= fleet.load_prob <= 1.0, "fleet.load_prob", "must be in [0, 1]", fleet.load_prob)
    _check(
        0.0 < fleet.availability_min <= fleet.availability_max <= 1.0,
        "fleet.availability_min/max",
        "must satisfy 0 < min <= max <= 1",
        (fleet.availability_min, fleet.availability_max),
    )
    if fleet.deadline_s is not None:
        _check(fleet.deadline_s > 0, "fleet.deadline_s", "must be > 0 or null", fleet.deadline_s)
    for name, weight in fleet.mix.items():
        _check(weight >= 0, f"fleet.mix.{name}", "must be >= 0", weight)
    _validate_training(cfg)
    _validate_data(cfg)
    _validate_engine(cfg.engine)
    _validate_faults(cfg.faults)
    _validate_names(cfg)


def _validate_training(cfg: RunConfig) -> None:
    algo = cfg.algorithm
    _check(algo.local_epochs >= 0, "algorithm.local_epochs", "must be >= 0", algo.local_epochs)
    _check(algo.lr > 0, "algorithm.lr", "must be > 0", algo.lr)
    _check(algo.batch_size >= 1, "algorithm.batch_size", "must be >= 1", algo.batch_size)
    _check(algo.optimizer in ("adam", "sgd"), "algorithm.optimizer", "must be 'adam' or 'sgd'", algo.optimizer)
    _check(0.0 <= algo.momentum < 1.0, "algorithm.momentum", "must be in [0, 1)", algo.momentum)
    eclm = algo.eclm
    _check(eclm.load_balance_weight >= 0, "algorithm.eclm.load_balance_weight", "must be >= 0", eclm.load_balance_weight)
    _check(eclm.ability_epochs >= 0, "algorithm.eclm.ability_epochs", "must be >= 0", eclm.ability_epochs)
    subtask_rules = ("cooccurrence", "fixed")
    _check(eclm.subtasks in subtask_rules, "algorithm.eclm.subtasks", f"must be one of {subtask_rules}", eclm.subtasks)
    _check(eclm.subtask_size >= 1, "algorithm.eclm.subtask_size", "must be >= 1", eclm.subtask_size)
    if eclm.kappa1 is not None:
        _check(eclm.kappa1 > 0, "algorithm.eclm.kappa1", "must be > 0 or null", eclm.kappa1)
    _check(eclm.kappa2 >= 1, "algorithm.eclm.kappa2", "must be >= 1", eclm.kappa2)
    _check(eclm.kl_weight >= 0, "algorithm.eclm.kl_weight", "must be >= 0", eclm.kl_weight)
    _check(0 < eclm.size_cap <= 1, "algorithm.eclm.size_cap", "must be in (0, 1]", eclm.size_cap)
    _check(eclm.round_budget_s > 0, "algorithm.eclm.round_budget_s", "must be > 0", eclm.round_budget_s)
    hfl = algo.heterofl
    allowed = (1.0, 0.5, 0.25, 0.125, 0.0625)
    _check(
        bool(hfl.rates) and all(r in allowed for r in hfl.rates),
        "algorithm.heterofl.rates", f"must be a non-empty subset of {allowed}", hfl.rates,
    )
    if hfl.round_budget_s is not None:
        _check(hfl.round_budget_s > 0, "algorithm.heterofl.round_budget_s", "must be > 0 or null", hfl.round_budget_s)
    _check(0 < hfl.budget_quantile <= 1, "algorithm.heterofl.budget_quantile", "must be in (0, 1]", hfl.budget_quantile)
    _check(hfl.multirate_epochs >= 0, "algorithm.heterofl.multirate_epochs", "must be >= 0", hfl.multirate_epochs)
    if hfl.clip_grad_norm is not None:
        _check(0 < hfl.clip_grad_norm < float("inf"), "algorithm.heterofl.clip_grad_norm",
               "must be a finite number > 0 or null", hfl.clip_grad_norm)
    _check_cema(cfg)
    _check_tta(cfg)
    _check_elastic(cfg)
    pre = cfg.pretrain
    _check(pre.epochs >= 0, "pretrain.epochs", "must be >= 0", pre.epochs)
    _check(pre.lr > 0, "pretrain.lr", "must be > 0", pre.lr)
    _check(pre.batch_size >= 1, "pretrain.batch_size", "must be >= 1", pre.batch_size)
    schedules = ("constant", "onecycle")
    _check(pre.schedule in schedules, "pretrain.schedule", f"must be one of {schedules}", pre.schedule)
    model = cfg.model
    _check(model.width >= 1, "model.width", "must be >= 1", model.width)
    for key in ("top_k", "modules_per_layer"):
        value = getattr(model, key)
        if value is not None:
            _check(value >= 1, f"model.{key}", "must be >= 1 or null", value)
    if model.shrink is not None:
        _check(0 < model.shrink <= 1, "model.shrink", "must be in (0, 1] or null", model.shrink)


def _validate_data(cfg: RunConfig) -> None:
    data, part, scen = cfg.dataset, cfg.dataset.partition, cfg.scenario
    _check(0.0 < data.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)", data.test_fraction)
    _check(0.0 < data.proxy_fraction < 1.0, "dataset.proxy_fraction", "must be in (0, 1)", data.proxy_fraction)
    _check(data.proxy_samples >= 1, "dataset.proxy_samples", "must be >= 1", data.proxy_samples)
    _check(data.global_test_samples >= 1, "dataset.global_test_samples", "must be >= 1", data.global_test_samples)
    kinds = ("label_skew", "dirichlet", "iid")
    _check(part.kind in kinds, "dataset.partition.kind", f"must be one of {kinds}", part.kind)
    _check(part.classes_per_device >= 1, "dataset.partition.classes_per_device", "must be >= 1", part.classes_per_device)
    _check(part.alpha > 0, "dataset.partition.alpha", "must be > 0", part.alpha)
    _check(
        1 <= part.size_min <= part.size_max,
        "dataset.partition.size_min/size_max",
        "must satisfy 1 <= size_min <= size_max",
        (part.size_min, part.size_max),
    )
    _check(part.test_size >= 1, "dataset.partition.test_size", "must be >= 1", part.test_size)
    aug = data.augment
    for key in ("rotate_deg", "scale", "translate_px", "stroke_px"):
        _check(getattr(aug, key) >= 0, f"dataset.augment.{key}", "must be >= 0", getattr(aug, key))
    _check(0.0 <= scen.replace_fraction <= 1.0, "scenario.replace_fraction", "must be in [0, 1]", scen.replace_fraction)
    _check(scen.slot_rounds >= 1, "scenario.slot_rounds", "must be >= 1", scen.slot_rounds)
    _check(1 <= scen.severity <= 5, "scenario.severity", "must be in 1..5", scen.severity)
    _check(scen.stream_batch >= 1, "scenario.stream_batch", "must be >= 1", scen.stream_batch)
    _check(scen.batches_per_domain >= 1, "scenario.batches_per_domain", "must be >= 1", scen.batches_per_domain)


def _validate_engine(engine: EngineConfig) -> None:
    backends = ("auto", "ray", "processes")
    _check(engine.backend in backends, "engine.backend", f"must be one of {backends}", engine.backend)
    if engine.backend == "processes":
        _check(engine.ray_address is None, "engine.ray_address",
               "needs the Ray backend (a Ray cluster): set engine.backend=ray or engine.ray_address=null",
               engine.ray_address)
        _check(engine.num_gpus == 0, "engine.num_gpus",
               "is a Ray resource: set engine.backend=ray to share GPUs between ClientApps", engine.num_gpus)
    _check(engine.num_cpus > 0, "engine.num_cpus", "must be > 0", engine.num_cpus)
    _check(engine.num_gpus >= 0, "engine.num_gpus", "must be >= 0", engine.num_gpus)
    _check(engine.torch_threads >= 1, "engine.torch_threads", "must be >= 1", engine.torch_threads)
    _check(engine.round_timeout_s > 0, "engine.round_timeout_s", "must be > 0", engine.round_timeout_s)


def _validate_faults(faults: FaultsConfig) -> None:
    from experiments.fleet.faults import FAULT_ACTIONS, FAULT_KINDS

    _check(0.0 <= faults.fraction <= 1.0, "faults.fraction", "must be in [0, 1]", faults.fraction)
    _check(
        bool(faults.kinds) and set(faults.kinds) <= set(FAULT_KINDS),
        "faults.kinds", f"must be a non-empty list of {FAULT_KINDS}", faults.kinds,
    )
    _check(
        bool(faults.actions) and set(faults.actions) <= set(FAULT_ACTIONS),
        "faults.actions", f"must be a non-empty list of {FAULT_ACTIONS}", faults.actions,
    )
    if faults.crash_server_round is not None:
        _check(faults.crash_server_round >= 0, "faults.crash_server_round", "must be >= 0 or null",
               faults.crash_server_round)

def _validate_names(cfg: RunConfig) -> None:
    """Names that must exist in a registry (imported lazily: they pull in torch)."""
    from experiments.algorithms.registry import ALGORITHMS
    from models.catalog import model_names

    if cfg.algorithm.name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm.name {cfg.algorithm.name!r}; choose one of {sorted(ALGORITHMS)}")
    if cfg.model.name not in model_names():
        raise ConfigError(f"unknown model.name {cfg.model.name!r}; choose one of {list(model_names())}")
    datasets = ("digits", "cifar10", "cifar100", "imagenet_c")
    _check(cfg.dataset.name in datasets, "dataset.name", f"must be one of {datasets}", cfg.dataset.name)
    if cfg.dataset.name == "imagenet_c":
        _validate_imagenet_c(cfg)
    if cfg.scenario.corruptions:
        from experiments.data.corruptions import CORRUPTIONS

        for name in cfg.scenario.corruptions:
            if name not in CORRUPTIONS:
                raise ConfigError(f"unknown corruption {name!r} in scenario.corruptions; choose from {list(CORRUPTIONS)}")


def _validate_imagenet_c(cfg: RunConfig) -> None:
    """ImageNet-C: the online scenario, its folders on disk, and the networks' checkpoints.

    There is no proxy part to pre-train on, so the edge (source) network and, for CEMA, the
    foundation network must come from state dict files the user provides.
    """
    from experiments.data.imagenet_c import check_layout, check_scenario

    check_scenario(cfg.scenario)
    _check(not cfg.dataset.download, "dataset.download", "must be false for imagenet_c (it is never fetched; "
           "point dataset.root at your copy)", cfg.dataset.download)
    check_layout(cfg.dataset.root, cfg.scenario.corruptions, cfg.scenario.severity)
    fix = "ImageNet-C has no proxy part to pre-train on; set it to a torchvision state dict file"
    if cfg.model.checkpoint is None:
        raise ConfigError(f"model.checkpoint is null: {fix} of {cfg.model.name} (the edge / source network)")
    if cfg.algorithm.name == "cema" and cfg.algorithm.cema.foundation_checkpoint is None:
        raise ConfigError(
            f"algorithm.cema.foundation_checkpoint is null: {fix} of "
            f"{cfg.algorithm.cema.foundation_model} (CEMA's foundation network)"
        )


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


def _check_cema(cfg) -> None:
    """CEMA's options, with the rules its code applies (models/cema/filter.py check_filter_settings,
    strategies/cema.py, clients/cema.py), so a run validation accepts never fails on a device."""
    from clients.cema import EDGE_BN_CHOICES  # models stay out of validation's import time
    from models.catalog import model_names
    from strategies.cema import EDGE_MODES, SEND_MODES

    cema = cfg.algorithm.cema
    _check(cema.foundation_model in model_names(), "algorithm.cema.foundation_model",
           f"must be one of {list(model_names())}", cema.foundation_model)
    _check(cema.foundation_width >= 1, "algorithm.cema.foundation_width", "must be >= 1", cema.foundation_width)
    _check(cema.send in SEND_MODES, "algorithm.cema.send", f"must be one of {SEND_MODES}", cema.send)
    _check(cema.replay_capacity >= 1, "algorithm.cema.replay_capacity", "must be >= 1", cema.replay_capacity)
    _check(0 < cema.e_max <= 1, "algorithm.cema.e_max", "must be in (0, 1]", cema.e_max)
    if cema.e_min is not None:
        _check(0 <= cema.e_min < cema.e_max, "algorithm.cema.e_min",
               f"must satisfy 0 <= e_min < e_max={cema.e_max}, or be null (no lower bound)", cema.e_min)
    _check(cema.threshold_coeff > 0, "algorithm.cema.threshold_coeff", "must be > 0", cema.threshold_coeff)
    if cema.warmup_samples is not None:
        _check(cema.warmup_samples >= 1, "algorithm.cema.warmup_samples", "must be >= 1, or null (no warm-up)",
               cema.warmup_samples)
    if cema.d_margin is not None:
        _check(cema.d_margin > 0, "algorithm.cema.d_margin", "must be > 0, or null (the dataset's reference value)",
               cema.d_margin)
    _check(cema.edge_models in EDGE_MODES, "algorithm.cema.edge_models", f"must be one of {EDGE_MODES}", cema.edge_models)
    _check(cema.edge_bn in EDGE_BN_CHOICES, "algorithm.cema.edge_bn",
           "must be null (as algorithm.cema.tbr), 'batch' or 'running'", cema.edge_bn)


def _check_tta(cfg) -> None:
    """The on-device TTA baselines' options (algorithm.tta), with the rules their adapters apply
    (models/tta*.py), so a run validation accepts never fails on a device; null = the reference value."""
    from models.tta.lame import AFFINITIES  # models stay out of validation's import time
    from models.tta.norm import BN_STATS, ONDA_UPDATES
    from models.tta.settings import COTTA_LOSSES, OPTIMIZERS

    tta = cfg.algorithm.tta
    _check(tta.bn_adapt.stats in BN_STATS, "algorithm.tta.bn_adapt.stats", f"must be one of {BN_STATS}",
           tta.bn_adapt.stats)
    for key, value in (("bn_adapt.momentum", tta.bn_adapt.momentum), ("onda.momentum", tta.onda.momentum),
                       ("eta.entropy_fraction", tta.eta.entropy_fraction)):
        _check(0 < value <= 1, f"algorithm.tta.{key}", "must be in (0, 1]", value)
    _check(tta.onda.update in ONDA_UPDATES, "algorithm.tta.onda.update", f"must be one of {ONDA_UPDATES}",
           tta.onda.update)
    _check(0 <= tta.pl.threshold < 1, "algorithm.tta.pl.threshold", "must be in [0, 1)", tta.pl.threshold)
    for method in ("pl", "tent", "eta", "cotta"):
        options = getattr(tta, method)
        if options.optimizer is not None:
            _check(options.optimizer in OPTIMIZERS, f"algorithm.tta.{method}.optimizer",
                   f"must be one of {OPTIMIZERS}, or null (the dataset's reference)", options.optimizer)
        if options.lr is not None:
            _check(options.lr > 0, f"algorithm.tta.{method}.lr", "must be > 0, or null (the dataset's reference)",
                   options.lr)
    if tta.eta.d_margin is not None:
        _check(tta.eta.d_margin > 0, "algorithm.tta.eta.d_margin", "must be > 0, or null (the dataset's reference)",
               tta.eta.d_margin)
    cotta = tta.cotta
    for key in ("restore_prob", "anchor_threshold", "ema"):
        value = getattr(cotta, key)
        if value is not None:
            _check(0 <= value <= 1, f"algorithm.tta.cotta.{key}", "must be in [0, 1]", value)
    if cotta.loss is not None:
        _check(cotta.loss in COTTA_LOSSES, "algorithm.tta.cotta.loss",
               f"must be one of {COTTA_LOSSES}, or null (the dataset's reference)", cotta.loss)
    _check(cotta.augmentations >= 1, "algorithm.tta.cotta.augmentations", "must be >= 1", cotta.augmentations)
    _check(tta.lame.affinity in AFFINITIES, "algorithm.tta.lame.affinity", f"must be one of {AFFINITIES}",
           tta.lame.affinity)
    _check(tta.lame.knn >= 1, "algorithm.tta.lame.knn", "must be >= 1", tta.lame.knn)


def _check_elastic(cfg) -> None:
    """ElasticDNN's options, and the evolving-domain stream it needs (two batches per domain)."""
    from models.elastic.remodel import METHODS  # models stay out of validation's import time
    from models.elastic.modes import SHOT_LABEL_MODES
    from models.elastic.pretrain import SANDWICH_MODES

    opts = cfg.algorithm.elasticdnn
    _check(opts.method in METHODS, "algorithm.elasticdnn.method", f"must be one of {METHODS}", opts.method)
    _check(0 < opts.keep_fraction <= 1, "algorithm.elasticdnn.keep_fraction", "must be in (0, 1]", opts.keep_fraction)
    _check(0 < opts.mass <= 1, "algorithm.elasticdnn.mass", "must be in (0, 1]", opts.mass)
    losses = ("im", "tent", "feature_alignment")
    _check(opts.loss in losses, "algorithm.elasticdnn.loss", f"must be one of {losses}", opts.loss)
    _check(opts.epochs >= 1, "algorithm.elasticdnn.epochs", "must be >= 1", opts.epochs)
    _check(opts.lr > 0, "algorithm.elasticdnn.lr", "must be > 0", opts.lr)
    _check(opts.batch_size >= 2, "algorithm.elasticdnn.batch_size", "must be >= 2 (BatchNorm)", opts.batch_size)
    _check(opts.sandwich in SANDWICH_MODES, "algorithm.elasticdnn.sandwich", f"must be one of {SANDWICH_MODES}",
           opts.sandwich)
    _check(opts.compress_epochs >= 0, "algorithm.elasticdnn.compress_epochs", "must be >= 0 (0: no fine-tuning)",
           opts.compress_epochs)
    _check(opts.shot_labels in SHOT_LABEL_MODES, "algorithm.elasticdnn.shot_labels",
           f"must be one of {SHOT_LABEL_MODES}", opts.shot_labels)
    _check(not opts.bank_fedavg or opts.method == "elasticdnn", "algorithm.elasticdnn.bank_fedavg",
           "averages ElasticDNN's banks: set algorithm.elasticdnn.method=elasticdnn or bank_fedavg=false", opts.method)
    _check(not opts.bank_fedavg or opts.master_update, "algorithm.elasticdnn.bank_fedavg",
           "averages banks that only master updates change: set algorithm.elasticdnn.master_update=true", False)
    _check(not opts.write_back_bn or opts.master_update, "algorithm.elasticdnn.write_back_bn",
           "is part of the master update: set algorithm.elasticdnn.master_update=true or write_back_bn=false", False)
    if cfg.algorithm.name == "elasticdnn":
        scen = cfg.scenario
        _check(scen.name in ("online", "evolving"), "scenario",
               "ElasticDNN needs a stream of domains: use scenario=evolving", scen.name)
        _check(scen.batches_per_domain % 2 == 0, "scenario.batches_per_domain",
               "must be even for ElasticDNN (one batch to adapt on, one held out per domain)", scen.batches_per_domain)
