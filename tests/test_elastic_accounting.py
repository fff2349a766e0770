"""What an adaptation costs: FLOPs counted on the executed passes, memory by part, on tiny networks by hand."""

import copy
import threading

import pytest
import torch
from torch import nn

from models.costs import flop_counter
from models.elastic.accounting import FLOPS_KEY, adapt_and_account, method_footprint
from models.elastic.bank import DomainKnowledgeBank
from models.elastic.footprint import MemoryFootprint, module_bytes, optimizer_state_bytes, tensor_bytes
from models.elastic.ledger import PassLedger, counted_block
from models.elastic.master import ElasticMaster, elastic_fbs_resnet_cpu
from models.elastic.remodel import RemodelSettings, adapt_baseline, adapt_to_domain, pruned_model
from tests.test_elastic_retrain import PlainNet, make, shifted_batch

torch.set_num_threads(1)


class ConvLinear(nn.Module):
    """conv(1 -> 2, 3x3, no padding, no bias) on 1x4x4 -> 2x2x2, flatten, fc(8 -> 3).

    FLOPs per sample (torch's counter: 2 per multiply-add, biases not counted): conv
    2 * 8 outputs * 9 = 144, fc 2 * 8 * 3 = 48; forward 192.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


FORWARD = 144 + 48
# Backward with every parameter trained and the input not: fc grad-input 48 + grad-weight 48,
# conv grad-weight 144 (no grad-input: nothing before it needs one).
BACKWARD_ALL = 48 + 48 + 144
# Only fc trained: its grad-weight alone (no gradient flows into the frozen conv).
BACKWARD_FC = 48


def test_flops_of_recorded_passes_by_hand():
    torch.manual_seed(0)
    model = ConvLinear()
    ledger = PassLedger()
    with ledger.recording():
        with torch.no_grad():
            model(torch.randn(5, 1, 4, 4))
            model(torch.randn(5, 1, 4, 4))
        for _ in range(3):
            model(torch.randn(4, 1, 4, 4)).sum().backward()
        model(torch.randn(4, 1, 4, 4))  # a graph built but never used: forward only
        model.conv.weight.requires_grad_(False)
        model(torch.randn(2, 1, 4, 4)).pow(2).mean().backward()
    assert len(ledger.passes) == 7
    expected = 2 * 5 * FORWARD + 3 * 4 * (FORWARD + BACKWARD_ALL) + 4 * FORWARD + 2 * (FORWARD + BACKWARD_FC)
    assert ledger.flops() == expected == 8352  # 1920 + 5184 + 768 + 480


def test_counted_blocks_add_their_products_and_nothing_outside_a_recording():
    a, b = torch.ones(3, 4), torch.ones(4, 5)
    ledger = PassLedger()
    with ledger.recording():
        with counted_block():
            a @ b  # 2 * 3 * 4 * 5
        a @ b  # outside any block and any network: not counted
    assert ledger.flops() == 120
    with counted_block():  # no ledger records: a plain block
        assert (a @ b).shape == (3, 5)


@pytest.mark.parametrize("method", ["elasticdnn", "full", "tent", "shot", "bn_adapt", "source"])
def test_ledger_equals_torchs_counter_over_the_whole_adaptation(method):
    """Replaying each kind of pass once gives exactly what the counter sees running everything."""
    torch.manual_seed(0)
    elastic = elastic_fbs_resnet_cpu(num_classes=3, width=4, seed=0)
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    settings = RemodelSettings(epochs=2, batch_size=4)
    small = pruned_model(elastic) if method in ("tent", "shot", "bn_adapt", "source") else None
    counted, plain = copy.deepcopy((elastic, small)), copy.deepcopy((elastic, small))
    _, report = adapt_and_account(method, *counted, x, settings, seed=1)
    counter = flop_counter()
    with counter:
        adapt_to_domain(method, *plain, x, settings, seed=1)
    assert report[FLOPS_KEY] == counter.get_total_flops()
    assert (report[FLOPS_KEY] > 0) == (method != "source")


def test_activations_are_the_saved_tensors_by_hand():
    """fc(3 -> 2) then ReLU on a (4, 3) batch: autograd keeps the input (48 bytes) and the ReLU output (32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU())
    ledger = PassLedger()
    with ledger.recording():
        model(torch.randn(4, 3)).sum().backward()
        with torch.no_grad():
            model(torch.randn(40, 3))  # no graph: nothing saved
    assert [(p.backward, p.activation_bytes, p.gradient_bytes) for p in ledger.passes] == [(True, 80, 24), (False, 0, 0)]
    assert ledger.training_peak() == (80, 24)


def test_full_on_a_tiny_master_adds_up_to_the_hand_computed_total():
    """``full`` on PlainNet (tests/test_elastic_retrain.py), 100 samples of 3x6x6, batch 64.

    Master: 329 float32 parameters (1316 bytes) + BN buffers 4 + 4 + 5 + 5 floats and two int64
    counters (88) = 1404. Trained: every conv/BN tensor (the head stays frozen): 108 + 4 + 4 +
    180 + 5 + 5 + 5 = 311 floats = 1244 bytes of momentum, and 1244 of gradients. Activations of
    the 64-sample step: the input (3 channels), BN1's input, ReLU1's output (4 each), BN2's input,
    ReLU2's output (5 each), 64 x 36 pixels x 4 bytes each, + BN's saved means and inverse stds
    (4 + 4 + 5 + 5 floats) = 64 * 36 * 21 * 4 + 72 = 193,608 bytes.
    """
    master = make(PlainNet)
    elastic = ElasticMaster(master, DomainKnowledgeBank({}))
    ledger = PassLedger()
    with ledger.recording():
        report = adapt_baseline(master, shifted_batch(), "full", RemodelSettings(epochs=1))
    footprint = method_footprint("full", elastic, master, report["optimizer_state_bytes"], *ledger.training_peak())
    assert footprint == MemoryFootprint(master=1404, optimizer=1244, gradients=1244, activations=193_608)
    assert footprint.resident == 1404 + 1244 == 2648
    assert footprint.peak == 2648 + 1244 + 193_608 == 197_500
    metrics = footprint.metrics()
    assert metrics["resident_memory_bytes"] == 2648 and metrics["peak_memory_bytes"] == 197_500
    assert metrics["memory_bank_bytes"] == 0 and metrics["memory_activations_bytes"] == 193_608


def test_each_method_counts_its_own_parts_by_hand():
    """Master and model: PlainNet (1404 bytes each); bank: one layer of 4 filters 3x3x3 + 4x4 relevance = 496."""
    bank = DomainKnowledgeBank({"conv1": (torch.zeros(4, 3, 3, 3), torch.eye(4))})
    elastic, model = ElasticMaster(make(PlainNet), bank), make(PlainNet)
    assert module_bytes(bank) == 496
    elastic_dnn = method_footprint("elasticdnn", elastic, model, optimizer=100, activations=7, gradients=3)
    assert (elastic_dnn.master, elastic_dnn.bank, elastic_dnn.model) == (1404, 496, 1404)
    assert elastic_dnn.resident == 1404 + 496 + 1404 + 100 and elastic_dnn.peak == elastic_dnn.resident + 10
    assert method_footprint("tent", elastic, model, optimizer=8).resident == 1404 + 8  # its model only
    assert method_footprint("full", elastic, elastic.master, optimizer=0).master == 1404
    with pytest.raises(ValueError, match="choose one of"):
        method_footprint("ekya", elastic, model, optimizer=0)
    with pytest.raises(ValueError, match=">= 0 bytes"):
        MemoryFootprint(model=-1)


def test_elasticdnn_reports_master_bank_and_surrogate_on_a_real_master():
    torch.manual_seed(0)
    elastic = elastic_fbs_resnet_cpu(num_classes=3, width=4, seed=0)
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    surrogate, report = adapt_and_account("elasticdnn", elastic, None, x, RemodelSettings(epochs=1, batch_size=4))
    assert report["memory_master_bytes"] == module_bytes(elastic.master)
    assert report["memory_bank_bytes"] == module_bytes(elastic.bank)
    assert report["memory_model_bytes"] == module_bytes(surrogate) < module_bytes(elastic.master) / 4
    assert 0 < report["memory_optimizer_bytes"] <= module_bytes(surrogate)
    assert "optimizer_state_bytes" not in report
    assert report["resident_memory_bytes"] == sum(report[f"memory_{p}_bytes"] for p in
                                                  ("master", "bank", "model", "optimizer"))


def test_optimizer_state_and_tensor_bytes():
    weight = nn.Parameter(torch.ones(3, 2))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.sum().backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == 24  # one momentum buffer of 6 floats
    assert tensor_bytes([weight, weight]) == 24  # the same tensor once


def test_recording_is_per_thread_and_one_at_a_time():
    model = ConvLinear()
    ledger = PassLedger()
    with ledger.recording():
        worker = threading.Thread(target=lambda: model(torch.zeros(1, 1, 4, 4)))
        worker.start()
        worker.join()
        with pytest.raises(RuntimeError, match="one adaptation at a time"):
            with PassLedger().recording():
                pass
        with pytest.raises(RuntimeError, match="after the recording block"):
            ledger.flops()
    assert ledger.passes == []  # the other thread's pass is not this device's
    with pytest.raises(ValueError, match="tensor as its first argument"):
        with PassLedger().recording():
            model(x=torch.zeros(1, 1, 4, 4))
