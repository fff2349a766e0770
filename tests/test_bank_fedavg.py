"""FedAvg over ElasticDNN's banks (an extension beyond the paper): the bank's arithmetic, the cloud, the device."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from clients.base import MALFORMED_MESSAGE
from clients.elastic import BANK_KEY, ElasticClient
from models.elastic.bank import bank_thetas, build_bank, load_bank_thetas
from models.elastic.fbs import GatedConvBN
from strategies.base import DeviceInfo
from strategies.elastic import ElasticDNN
from tests.test_elastic_client import BUDGET, _context, _device, _message, _model

torch.set_num_threads(1)


def _two_filter_master():
    unit = GatedConvBN(1, 2, kernel_size=1)
    master = nn.Sequential(unit)
    bank = build_bank(master)
    with torch.no_grad():
        bank.layer("0")[1].copy_(torch.tensor([[1.0, 0.5], [0.0, 2.0]]))
    return master, bank


def test_loading_averaged_thetas_rebuilds_every_filter_by_eq4():
    master, bank = _two_filter_master()
    average = {"0": torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)}  # the fleet's mean theta*
    load_bank_thetas(master, bank, average)
    assert torch.equal(bank.layer("0")[0].flatten(), torch.tensor([1.0, 3.0]))
    # eq. 4 with W = [[1, .5], [0, 2]]: theta_0 = 1 + 1.5 = 2.5, theta_1 = 6
    assert torch.equal(master[0].conv.weight.flatten(), torch.tensor([2.5, 6.0]))
    shared = bank_thetas(bank)
    assert set(shared) == {"0"} and torch.equal(shared["0"].flatten(), torch.tensor([1.0, 3.0]))
    shared["0"].zero_()  # a copy: the bank is not touched
    assert bank.layer("0")[0].abs().sum() > 0


def test_bad_thetas_raise_and_change_nothing():
    master, bank = _two_filter_master()
    before = master[0].conv.weight.clone()
    with pytest.raises(ValueError, match="exactly the bank's layers"):
        load_bank_thetas(master, bank, {"1": torch.zeros(2, 1, 1, 1)})
    with pytest.raises(ValueError, match="shape"):
        load_bank_thetas(master, bank, {"0": torch.zeros(3, 1, 1, 1)})
    assert torch.equal(master[0].conv.weight, before)


def _strategy(bank):
    strategy = ElasticDNN(bank=bank, per_round=2, seed=0, expected_devices=2)
    for pid in (0, 1):
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, 0, dict(BUDGET))
        strategy._by_node[100 + pid] = pid
    return strategy


def _reply(strategy, pid, theta, n):
    sent = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=100 + pid,
                   message_type=MessageType.TRAIN)
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": n, "correct": 1, "accuracy": 1 / n}),
        "stream": ConfigRecord({"domain": "fog", "index": 1}),
        BANK_KEY: ArrayRecord({"0": Array(np.full((2, 1, 1, 1), theta, dtype=np.float32))}),
    })
    return Message(content, reply_to=sent)


def test_the_cloud_sends_its_bank_every_round_and_averages_the_replies_by_samples():
    bank = ArrayRecord({"0": Array(np.zeros((2, 1, 1, 1), dtype=np.float32))})
    strategy, arrays = _strategy(bank), ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    first = strategy.configure_train(1, arrays, ConfigRecord(), None)
    assert all(set(m.content.array_records) == {"arrays", BANK_KEY} for m in first)
    assert all(m.content["config"]["share_bank"] is True for m in first)
    _, metrics = strategy.aggregate_train(1, [_reply(strategy, 0, 1.0, 100), _reply(strategy, 1, 4.0, 300)])
    assert metrics["banks_averaged"] == 2
    assert np.allclose(strategy.bank["0"].numpy(), 0.25 * 1.0 + 0.75 * 4.0)  # 3.25
    second = strategy.configure_train(2, arrays, ConfigRecord(), None)
    assert all(set(m.content.array_records) == {BANK_KEY} for m in second)  # both served, the bank still goes
    restored = _strategy(ArrayRecord({"0": Array(np.zeros((2, 1, 1, 1), dtype=np.float32))}))
    restored.load_state_dict(strategy.state_dict())
    assert np.array_equal(restored.bank["0"].numpy(), strategy.bank["0"].numpy())


def test_without_a_bank_nothing_is_shared():
    strategy = ElasticDNN(per_round=1, seed=0, expected_devices=1)
    assert "share_bank" not in strategy.train_config(1)
    assert strategy.state_dict()["bank"] is None


def test_a_device_adopts_the_fleet_bank_and_replies_with_its_own():
    client, context, master = ElasticClient(_device()), _context(), _model()
    thetas = bank_thetas(master.bank)
    msg = _message(1, ArrayRecord(master.state_dict()))
    msg.content["config"] = ConfigRecord({"round": 1, "share_bank": True})
    msg.content[BANK_KEY] = ArrayRecord({k: 0.5 * v for k, v in thetas.items()})
    reply = client.handle("train", msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    back = reply.content.array_records[BANK_KEY].to_torch_state_dict()
    assert set(back) == set(thetas) and all(back[k].shape == thetas[k].shape for k in thetas)
    # the device started from half the bank: its bank is far from the pre-trained one
    assert all(back[k].abs().sum() < 0.8 * thetas[k].abs().sum() for k in thetas)


def test_a_bank_that_does_not_fit_is_refused_by_name():
    client, master = ElasticClient(_device()), _model()
    msg = _message(1, ArrayRecord(master.state_dict()))
    msg.content[BANK_KEY] = ArrayRecord({"nope": torch.zeros(2)})
    reply = client.handle("train", msg, _context())
    assert reply.has_error() and reply.error.code == MALFORMED_MESSAGE and BANK_KEY in reply.error.reason
