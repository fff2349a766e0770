"""The cloud's compressed same-size model for ElasticDNN's baselines, and the hyperparameter search."""

import copy

import pytest
import torch

from experiments.algorithms.elasticdnn import compressed_baseline, compressed_cache_path, strategy_args
from experiments.claims import elastic_tune
from experiments.claims.elastic_multiapp import DomainBatch
from experiments.config import from_dict
from experiments.data import build_federated_data, to_tensor
from models.elastic.master import elastic_fbs_resnet_cpu
from models.elastic.remodel import RemodelSettings, pruned_model
from models.training import accuracy

torch.set_num_threads(1)


def _cfg(tmp_path, **elastic):
    return from_dict({
        "algorithm": {"name": "elasticdnn", "elasticdnn": {"method": "tent", "compress_epochs": 8, "keep_fraction": 0.5, **elastic}},
        "scenario": {"name": "evolving"},
        "dataset": {"proxy_samples": 400, "global_test_samples": 100},
        "fleet": {"devices": 2, "per_round": 2},
        "model": {"name": "elastic_fbs_resnet_cpu", "width": 8},
        "pretrain": {"cache_dir": str(tmp_path), "lr": 3e-3},
    }, resolve_model=True)


def test_the_compressed_model_is_the_pruned_master_fine_tuned_and_cached(tmp_path):
    cfg = _cfg(tmp_path)
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    elastic = elastic_fbs_resnet_cpu(num_classes=data.num_classes, width=8, seed=0)
    master_state = copy.deepcopy(elastic.state_dict())
    x, y = to_tensor(data.proxy()[0]), torch.as_tensor(data.proxy()[1])
    pruned = pruned_model(elastic, 0.5)
    small = compressed_baseline(cfg, elastic, data)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert accuracy(small, x, y) > accuracy(pruned, x, y) + 0.1  # fine-tuning taught it the proxy part (0.26 vs 0.10)
    assert all(torch.equal(v, master_state[k]) for k, v in elastic.state_dict().items())  # master untouched
    assert compressed_cache_path(cfg).exists()
    again = compressed_baseline(cfg, elastic, data)  # from the cache: the same weights, no training
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in again.state_dict().items())
    other = compressed_cache_path(_cfg(tmp_path, compress_epochs=4))
    assert other != compressed_cache_path(cfg) and other.parent == compressed_cache_path(cfg).parent


def test_only_the_same_size_baselines_get_a_compressed_model(tmp_path):
    for elastic in ({"method": "elasticdnn"}, {"method": "full"}, {"method": "tent", "compress_epochs": 0}):
        assert strategy_args(_cfg(tmp_path, **elastic), None, None) == {}


def _tiny_batches(count=2):
    gen = torch.Generator().manual_seed(1)
    return [DomainBatch(f"d{i}", torch.randn(8, 3, 32, 32, generator=gen), torch.randn(6, 3, 32, 32, generator=gen),
                        torch.randint(0, 3, (6,), generator=gen)) for i in range(count)]


def test_the_search_grid_tunes_trained_methods_only():
    points = elastic_tune.grid(["source", "tent"], [1e-2, 1e-3], [10, 20])
    assert points == [("source", 1e-2, 10), ("tent", 1e-2, 10), ("tent", 1e-2, 20), ("tent", 1e-3, 10),
                      ("tent", 1e-3, 20)]
    with pytest.raises(ValueError, match="unknown methods"):
        elastic_tune.grid(["magic"], [1e-3], [10])


def test_a_sequence_run_leaves_the_callers_models_unchanged_and_scores_every_domain():
    elastic = elastic_fbs_resnet_cpu(num_classes=3, width=4, seed=0)
    state = copy.deepcopy(elastic.state_dict())
    settings = RemodelSettings(epochs=1, batch_size=4, keep_fraction=0.5)
    for method in ("elasticdnn", "tent"):
        row = elastic_tune.run_sequence(method, elastic, None, _tiny_batches(), settings)
        assert 0 <= row["before"] <= 1 and 0 <= row["after"] <= 1 and row["seconds"] > 0
    assert all(torch.equal(v, state[k]) for k, v in elastic.state_dict().items())
    source = elastic_tune.run_sequence("source", elastic, None, _tiny_batches(), settings)
    assert source["before"] == source["after"]  # nothing adapts


def test_the_search_table_marks_each_methods_best_point():
    rows = [{"method": "tent", "lr": 1e-2, "epochs": 10, "before": 0.5, "after": 0.6, "seconds": 1.0},
            {"method": "tent", "lr": 1e-3, "epochs": 10, "before": 0.5, "after": 0.7, "seconds": 1.0}]
    lines = elastic_tune.markdown(rows).splitlines()
    assert "| 60.0 |" in lines[2] and "**70.0**" in lines[3]


def test_the_masters_sandwich_mode_keys_its_pre_training_and_is_checked(tmp_path):
    from experiments.algorithms import algorithm_named
    from experiments.pretrain.cache import pretrain_cache_path
    from experiments.schema import ConfigError
    from experiments.validation import validate

    def cache_path(cfg):
        return pretrain_cache_path(cfg, algorithm_named("elasticdnn").pretraining(cfg))

    both, largest = _cfg(tmp_path), _cfg(tmp_path, sandwich="largest")
    assert both.algorithm.options.sandwich == "both"  # the default: the sandwich rule's both extremes
    assert cache_path(both) != cache_path(largest)
    assert cache_path(both) == cache_path(_cfg(tmp_path, epochs=3))  # device options do not
    with pytest.raises(ConfigError, match="algorithm.elasticdnn.sandwich"):
        validate(_cfg(tmp_path, sandwich="smallest"))


def test_the_shot_label_mode_reaches_the_device_settings_and_is_checked(tmp_path):
    from clients.elastic import SETTING_KEYS
    from experiments.algorithms.elasticdnn import client_options
    from experiments.schema import ConfigError

    assert _cfg(tmp_path).algorithm.options.shot_labels == "eval"  # tim-learn/SHOT: netF.eval() before obtain_label
    options = client_options(_cfg(tmp_path, method="shot", shot_labels="batch"))
    settings = RemodelSettings(**{k: options[k] for k in SETTING_KEYS if k in options})
    assert settings.shot_labels == "batch"
    with pytest.raises(ConfigError, match="algorithm.elasticdnn.shot_labels"):
        _cfg(tmp_path, shot_labels="train")
