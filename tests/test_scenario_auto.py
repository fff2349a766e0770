"""``scenario=auto`` (the default): each algorithm runs in its own setting unless told otherwise."""

from __future__ import annotations

import dataclasses

import pytest

from experiments.algorithms import ALGORITHMS
from experiments.config import compose, from_flat, resolve_partition, scenario_named
from experiments.schema import ConfigError

#: The settings the papers use, written out by hand (the plug-ins must agree).
OWN_SCENARIO = {
    "eclm": "corrupted", "fedavg": "corrupted", "heterofl": "corrupted", "fedrolex": "corrupted", "an": "corrupted",
    "local": "corrupted", "none": "corrupted",
    "cema": "online", "source": "online", "bn_adapt": "online", "onda": "online", "lame": "online", "pl": "online",
    "tent": "online", "cotta": "online", "eta": "online", "eta_upload": "online",
    "elasticdnn": "evolving",
}


def test_every_registered_algorithm_has_its_setting_written_out_here():
    assert set(OWN_SCENARIO) == set(ALGORITHMS)


@pytest.mark.parametrize("name", sorted(OWN_SCENARIO))
def test_the_algorithm_alone_runs_in_its_own_scenario_with_the_files_values(name):
    cfg = compose([f"algorithm={name}"])
    assert cfg.scenario == scenario_named(OWN_SCENARIO[name])
    assert cfg.dataset.partition.kind == cfg.scenario.partition


def test_online_and_evolving_settings_stream_every_class_and_eclms_keeps_label_skew():
    assert compose(["algorithm=cema"]).dataset.partition.kind == "iid"
    evolving = compose(["algorithm=elasticdnn"])
    assert (evolving.scenario.stream_batch, evolving.scenario.batches_per_domain, evolving.scenario.severity) == (100, 2, 5)
    assert compose(["algorithm=eclm"]).dataset.partition.kind == "label_skew"


def test_an_explicit_scenario_a_value_and_a_partition_win_over_the_algorithms_own():
    one_step = compose(["algorithm=cema", "scenario=one_step"])
    assert (one_step.scenario.name, one_step.scenario.corruptions, one_step.dataset.partition.kind) == (
        "one_step", (), "label_skew")
    milder = compose(["algorithm=cema", "scenario.severity=3"])
    assert (milder.scenario.name, milder.scenario.severity) == ("online", 3)
    assert milder.scenario.corruptions == scenario_named("online").corruptions
    skewed = compose(["algorithm=tent", "dataset.partition.kind=label_skew"])
    assert (skewed.scenario.name, skewed.dataset.partition.kind) == ("online", "label_skew")


def test_flowers_flat_config_resolves_the_same_way():
    cfg = from_flat({"algorithm.name": "tent", "scenario.name": "auto", "scenario.severity": ""})
    assert cfg.scenario == scenario_named("online")


def test_a_combination_that_cannot_work_fails_before_the_run_with_the_reason():
    with pytest.raises(ConfigError, match="use scenario=evolving"):
        compose(["algorithm=elasticdnn", "scenario=one_step"])


def test_unknown_scenario_files_and_partitionless_scenarios_are_clear_errors():
    with pytest.raises(ConfigError, match=r"no file conf/scenario/rain.yaml; choose from \['continuous', 'corrupted'"):
        scenario_named("rain")
    cfg = compose(["algorithm=fedavg"])
    auto = dataclasses.replace(cfg.dataset.partition, kind="auto")
    bare = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, partition=auto),
                               scenario=dataclasses.replace(cfg.scenario, partition=None))
    with pytest.raises(ConfigError, match="set scenario.partition or dataset.partition.kind"):
        resolve_partition(bare)
