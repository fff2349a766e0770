"""One schema, two doors: Hydra config and Flower run_config give the same RunConfig."""

import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.config import from_dict, from_flat, from_hydra, to_flat
from experiments.schema import ConfigError, RunConfig, config_hash

ROOT = Path(__file__).resolve().parents[1]


def _hydra(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["output_dir=null", *overrides])


def test_hydra_defaults_build_a_valid_config():
    cfg = from_hydra(_hydra())
    assert cfg.algorithm.name == "eclm" and cfg.model.name == "modular_resnet18"  # model=auto resolved
    assert cfg.fleet.devices == 100 and cfg.fleet.per_round == 4
    assert cfg.dataset.partition.size_min == 50 and cfg.dataset.partition.size_max == 150


def test_dataclass_defaults_equal_the_hydra_tree():
    assert from_hydra(_hydra()) == from_dict({})
    assert RunConfig().model.name == "auto"


def test_auto_model_follows_the_algorithm():
    assert from_hydra(_hydra("algorithm=fedavg")).model.name == "cnn"
    assert from_hydra(_hydra("algorithm=an")).model.name == "multibranch_cnn"
    assert from_hydra(_hydra("algorithm=fedavg", "model=resnet18")).model.name == "resnet18"


def test_pyproject_flower_config_is_the_flat_hydra_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    from experiments.flwr_toml import default_flat_config

    assert table == default_flat_config(), "run: python -m experiments.flwr_toml"
    assert table["model.name"] == "auto" and from_flat(table).model.name == "modular_resnet18"


def test_flat_and_nested_doors_agree():
    cfg = from_hydra(_hydra("fleet.devices=20", "fleet.per_round=4", "scenario=shifting"))
    assert from_flat(to_flat(cfg)) == cfg
    assert cfg.scenario.corruptions[0] == "gaussian_noise"


def test_flat_lists_and_nulls():
    cfg = from_flat({"scenario.corruptions": "fog, snow", "fleet.deadline_s": "", "engine.ray_address": "auto"})
    assert cfg.scenario.corruptions == ("fog", "snow")
    assert cfg.fleet.deadline_s is None and cfg.engine.ray_address == "auto"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"fleet": {"devices": 5, "per_round": 6}}, "fleet.per_round=6 exceeds fleet.devices=5"),
        ({"flet": {"devices": 5}}, "unknown config key 'flet'"),
        ({"fleet": {"devcies": 5}}, "unknown config key 'fleet.devcies'"),
        ({"algorithm": {"name": "fedsgd"}}, "unknown algorithm.name 'fedsgd'"),
        ({"algorithm": {"lr": -0.1}}, "algorithm.lr must be > 0"),
        ({"algorithm": {"lr": "fast"}}, "algorithm.lr must be a number"),
        ({"rounds": 2.5}, "rounds must be an integer"),
        ({"fleet": {"load_prob": 1.5}}, "fleet.load_prob must be in"),
        ({"dataset": {"partition": {"size_min": 200}}}, "size_min <= size_max"),
        ({"dataset": {"partition": {"kind": "pathological"}}}, "dataset.partition.kind"),
        ({"scenario": {"corruptions": ["rain"]}}, "unknown corruption 'rain'"),
        ({"scenario": {"severity": 6}}, "scenario.severity must be in 1..5"),
        ({"model": {"name": "resnet1000"}}, "unknown model.name"),
        ({"engine": {"num_cpus": 0}}, "engine.num_cpus must be > 0"),
    ],
)
def test_bad_values_fail_with_one_clear_message(raw, message):
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert message in str(info.value)


def test_config_hash_is_stable_and_sensitive():
    a, b = RunConfig(), RunConfig(seed=1)
    assert config_hash(a) == config_hash(RunConfig())
    assert config_hash(a) != config_hash(b)
    assert len(config_hash(a.dataset)) == 16


def test_every_algorithms_yaml_block_equals_its_options_defaults():
    from experiments.algorithms import ALGORITHMS

    for name, algorithm in ALGORITHMS.items():
        cfg = from_hydra(_hydra(f"algorithm={name}", "scenario=evolving" if name == "elasticdnn" else "seed=0"))
        expected = None if algorithm.options is None else algorithm.options()
        assert cfg.algorithm.options == expected, name


def test_an_algorithms_block_is_read_only_when_it_is_selected():
    cfg = from_dict({"algorithm": {"name": "fedavg", "eclm": {"size_cap": 0.5}}})
    assert cfg.algorithm.options is None  # fedavg has no settings; eclm's block was checked, then dropped
    assert from_dict({"algorithm": {"eclm": {"size_cap": 0.5}}}).algorithm.options.size_cap == 0.5
    with pytest.raises(ConfigError, match="unknown config key 'algorithm.eclm.size_cup'"):
        from_dict({"algorithm": {"name": "fedavg", "eclm": {"size_cup": 0.5}}})
    with pytest.raises(ConfigError, match="unknown algorithm.name 'fedsgd'"):
        from_dict({"algorithm": {"name": "fedsgd"}})


def test_the_flat_table_holds_every_algorithms_block_and_selects_one():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    from experiments.algorithms import option_keys

    for key in option_keys():
        assert any(k.startswith(f"algorithm.{key}.") for k in table), key
    cema = from_flat({**table, "algorithm.name": "cema", "algorithm.cema.tbr": "false", "scenario.name": "online"})
    assert cema.algorithm.options.tbr is False and cema.model.name == "cnn"
    assert to_flat(cema)["algorithm.cema.tbr"] is False and "algorithm.eclm.size_cap" not in to_flat(cema)


def test_results_config_names_an_algorithms_settings_by_their_block():
    from experiments.schema import to_dict

    raw = to_dict(from_dict({"algorithm": {"name": "heterofl", "heterofl": {"global_sbn": False}}}))
    assert raw["algorithm"]["heterofl"]["global_sbn"] is False and "options" not in raw["algorithm"]
    assert from_dict(raw) == from_dict({"algorithm": {"name": "heterofl", "heterofl": {"global_sbn": False}}})
