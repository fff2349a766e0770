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
