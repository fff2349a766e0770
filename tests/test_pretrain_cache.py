"""Cloud pre-training: trained once on the proxy part, then loaded without rendering the proxy again."""

import torch

from experiments.config import from_dict
from experiments.data import build_federated_data
from experiments.pretrain.cache import pretrain_cache_path, pretrained_model
from experiments.pretrain.networks import build_run_model

SMALL = {"dataset": {"proxy_samples": 64, "global_test_samples": 32}, "pretrain": {"epochs": 1},
         "model": {"name": "cnn", "width": 4}, "algorithm": {"name": "fedavg"}, "fleet": {"devices": 4, "per_round": 2}}


class CountingData:
    """The run's data, counting how often the cloud renders its proxy part."""

    def __init__(self, data):
        self._data, self.proxy_calls = data, 0

    def __getattr__(self, name):
        return getattr(self._data, name)

    def proxy(self):
        self.proxy_calls += 1
        return self._data.proxy()


def test_the_proxy_is_rendered_only_when_the_model_must_be_trained(tmp_path):
    cfg = from_dict({**SMALL, "pretrain": {**SMALL["pretrain"], "cache_dir": str(tmp_path)}})
    data = CountingData(build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed))
    trained = pretrained_model(cfg, build_run_model(cfg.model, data.num_classes, 3), data)
    assert data.proxy_calls == 1 and pretrain_cache_path(cfg).exists()
    loaded = pretrained_model(cfg, build_run_model(cfg.model, data.num_classes, 3), data)
    assert data.proxy_calls == 1  # the cache hit rendered nothing
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.state_dict().items())


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_initial_weights_come_from_the_run_seed_not_the_process():
    cfg = from_dict(SMALL)
    torch.manual_seed(1)  # two processes: torch seeds each one's default generator differently
    first = _weights(build_run_model(cfg.model, 10, 3, seed=0))
    after_first = torch.rand(1)
    torch.manual_seed(2)
    second = _weights(build_run_model(cfg.model, 10, 3, seed=0))
    assert all(torch.equal(v, second[k]) for k, v in first.items())
    other = _weights(build_run_model(cfg.model, 10, 3, seed=1))
    assert not torch.equal(first["classifier.weight"], other["classifier.weight"])
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)  # building drew nothing from the caller's generator


def test_two_fresh_caches_pre_train_the_same_model(tmp_path):
    models = []
    for cache, process_seed in (("a", 11), ("b", 12)):
        cfg = from_dict({**SMALL, "pretrain": {**SMALL["pretrain"], "cache_dir": str(tmp_path / cache)}})
        data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
        torch.manual_seed(process_seed)
        models.append(_weights(pretrained_model(cfg, build_run_model(cfg.model, data.num_classes, 3, seed=cfg.seed),
                                                data)))
    assert all(torch.equal(v, models[1][k]) for k, v in models[0].items())
