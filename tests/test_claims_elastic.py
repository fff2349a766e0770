"""ElasticDNN claims preset: table/target/plot helpers and the multi-app experiment on tiny cases."""

import argparse
import copy

import numpy as np
import pytest
import torch
from torch import nn

from clients.elastic import training_passes
from experiments.claims import elastic as ce
from experiments.claims import elastic_multiapp as ma
from experiments.data import build_federated_data
from experiments.schema import DatasetConfig, FleetConfig, RunConfig, ScenarioConfig
from models.catalog import build_model
from models.elastic.master import elastic_fbs_resnet_cpu
from models.elastic.remodel import RemodelSettings
from models.elastic.scheduler import Schedule

#: Enough full-batch Adam steps to rank two sizes on these tiny tables (the default 500 is for real runs).
FIT_EPOCHS = 100


def run(rounds):
    return {"status": "completed", "rounds": rounds}


def record(acc, before, wall, virtual, memory, fraction):
    return {"accuracy": acc, "train_accuracy_before": before, "train_adapt_wall_s": wall,
            "train_compute_time_s": virtual, "train_peak_memory_bytes": memory, "train_model_fraction": fraction}


ELASTIC = run([record(0.6, 0.2, 0.5, 0.1, 100, 0.05), record(0.8, 0.4, 1.5, 0.3, 300, 0.05)])
FULL = run([record(0.9, 0.5, 4.0, 2.0, 1000, 1.0), record(0.7, 0.5, 4.0, 2.0, 1000, 1.0)])


# --------------------------------------------------------------------------- claims helpers
def test_method_row_averages_by_hand():
    row = ce.method_row(ELASTIC)
    assert row["accuracy"] == pytest.approx(0.7)  # (0.6 + 0.8) / 2
    assert row["accuracy_before"] == pytest.approx(0.3)
    assert row["wall_s"] == pytest.approx(1.0) and row["virtual_s"] == pytest.approx(0.2)
    assert row["peak_memory_bytes"] == 300 and row["model_fraction"] == pytest.approx(0.05)
    assert row["domains"] == 2
    assert ce.domain_curve(ELASTIC) == [0.6, 0.8]


def test_method_row_of_failed_run_is_none_and_table_says_failed():
    assert ce.method_row({"status": "failed", "rounds": []}) is None
    assert ce.method_row({**ELASTIC, "status": "running"}) is None  # interrupted: some domains missing
    table = ce.method_table({"elasticdnn": None, "full": ce.method_row(FULL)})
    assert "| elasticdnn | failed |" in table


def test_method_table_speedups_are_full_over_method():
    table = ce.method_table({"elasticdnn": ce.method_row(ELASTIC), "full": ce.method_row(FULL)})
    line = next(l for l in table.splitlines() if l.startswith("| elasticdnn"))
    assert "| 4.00x |" in line  # wall 4.0 / 1.0
    assert "| 10.00x |" in line  # virtual 2.0 / 0.2
    assert "| 70.0 |" in line and "| 5.0 % |" in line


def rows_with(elastic_acc, tent_acc, shot_acc, elastic_wall):
    base = {"accuracy_before": 0.1, "virtual_s": 1.0, "peak_memory_bytes": 1.0, "model_fraction": 0.2}
    return {"elasticdnn": {**base, "accuracy": elastic_acc, "wall_s": elastic_wall, "virtual_s": 0.1},
            "tent": {**base, "accuracy": tent_acc, "wall_s": 1.0},
            "shot": {**base, "accuracy": shot_acc, "wall_s": 1.0},
            "full": {**base, "accuracy": 0.9, "wall_s": 6.0}}


def test_targets_met_and_not_met():
    met = ce.targets(rows_with(0.70, 0.55, 0.60, 1.0), [{"elasticdnn": 0.8, "uniform": 0.7}])
    assert "(shot): +10.0 points" in met[0] and "**met**" in met[0]
    assert "6.00x faster" in met[1] and "**not met**" not in met[1]
    assert "+10.0 points" in met[2] and "**met**" in met[2]
    missed = ce.targets(rows_with(0.62, 0.55, 0.60, 2.0), [{"elasticdnn": 0.6, "uniform": 0.7}])
    assert all("**not met**" in line for line in missed[:1] + missed[2:])
    assert "3.00x faster" in missed[1] and "**not met**" in missed[1]  # wall 6 / 2 = 3 < 5
    assert "**met**" in missed[1]  # virtual 1.0 / 0.1 = 10x


def test_targets_with_a_failed_run_say_not_measured():
    rows = rows_with(0.7, 0.5, 0.5, 1.0)
    rows["tent"] = None
    lines = ce.targets(rows, None)
    assert lines[0].endswith("not measured (a run failed)") and len(lines) == 2


def test_plot_curves_writes_a_png(tmp_path):
    path = ce.plot_curves({"elasticdnn": [0.5, 0.7], "full": [0.6, 0.8], "failed": []}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_method_run_shares_the_same_overrides(tmp_path):
    args = argparse.Namespace(severity=5, width=8, partition="iid", devices=4, rounds=15, seed=3, out=tmp_path)
    shared = ce.shared_overrides(args)
    assert "model.width=8" in shared and "seed=3" in shared and "fleet.per_round=4" in shared
    assert not any(o.startswith(("algorithm.elasticdnn.method", "hydra")) for o in shared)
    assert f"pretrain.cache_dir={tmp_path / 'pretrain_cache'}" in shared


# --------------------------------------------------------------------------- multi-app pieces
def test_split_domains_and_app_sequences_by_hand():
    assert ma.split_domains(15) == (list(range(7)), list(range(7, 15)))
    with pytest.raises(ValueError, match="2 domains"):
        ma.split_domains(1)
    assert ma.app_sequences([3, 4, 5], 2) == [[3, 4, 5], [4, 5, 3]]
    with pytest.raises(ValueError, match="lower the app count"):
        ma.app_sequences([3, 4], 3)


def test_penultimate_features_are_the_last_linear_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    expected = torch.relu(model[0](x)).detach().double().numpy()
    np.testing.assert_allclose(ma.penultimate_features(model, x), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="no nn.Linear"):
        ma.penultimate_features(nn.ReLU(), x)


def plan(choice, shares, retrains, start=0.0):
    n = len(choice)
    return Schedule(choice=tuple(choice), shares=np.array(shares), retraining_time=np.zeros(n),
                    retrains=np.array(retrains), objective=0.0, feasible=True, worst_overrun=0.0,
                    iterations=0, start_time=start)


def test_check_window_is_eq_11():
    times = np.array([[1.0, 2.0], [1.0, 3.0]])
    ma.check_window(plan([0, 1], [0.25, 0.75], [True, True]), times, 4.0)  # 1/0.25 = 4, 3/0.75 = 4
    ma.check_window(plan([1, 1], [0.0, 1.0], [False, True]), times, 3.0)  # idle app 0 is not checked
    with pytest.raises(AssertionError, match=r"apps \[1\]"):
        ma.check_window(plan([0, 1], [0.5, 0.5], [True, True]), times, 4.0)  # 3/0.5 = 6 > 4
    with pytest.raises(AssertionError, match="violates eq. 11"):
        ma.check_window(plan([0, 0], [0.5, 0.5], [True, True], start=2.5), times, 4.0)  # 2.5 + 2 > 4


def synthetic(domains=4):
    """Sizes (0.2, 0.5): A = 0.5; Ã = 0.6 / 0.9; host seconds 1 / 2; 10 / 40 FLOPs."""
    sizes = (0.2, 0.5)
    rng = np.random.default_rng(0)
    return ma.Measurements(sizes, tuple(f"d{i}" for i in range(domains)), np.full((domains, 2), 0.5),
                           np.tile([0.6, 0.9], (domains, 1)), np.tile([1.0, 2.0], (domains, 1)),
                           np.tile([10.0, 40.0], (domains, 1)), rng.normal(size=(domains, 3)), np.zeros(3))


def test_simulate_scores_plans_with_measured_values_by_hand():
    meas = synthetic()
    train, test = ma.split_domains(4)
    estimator = ma.fit_estimator(meas, train, seed=0, epochs=FIT_EPOCHS)
    result = ma.simulate(meas, estimator, train, test, apps=2, t_max=100.0, time_factor=1.0, seed=0)
    # Uniform: both apps at 0.2 with 1/2 share: busy 2 s -> (0.5 * 2 + 0.6 * 98) / 100.
    assert result["uniform"] == pytest.approx(0.598)
    # Oracle: both at 0.5, eq. 10 shares 1/2: busy 4 s -> (0.5 * 4 + 0.9 * 96) / 100.
    assert result["oracle"] == pytest.approx(0.884)
    assert result["elasticdnn"] == pytest.approx(0.884)  # calibrated estimates rank the sizes right
    assert result["ekya_like"] <= 0.6 and result["fallbacks"] == 0


def test_simulate_falls_back_when_nothing_fits_the_window():
    meas = synthetic()
    train, test = ma.split_domains(4)
    estimator = ma.fit_estimator(meas, train, seed=0, epochs=FIT_EPOCHS)
    result = ma.simulate(meas, estimator, train, test, apps=2, t_max=1.5, time_factor=1.0, seed=0)
    assert result["fallbacks"] == 2 * len(test)  # ElasticDNN and the oracle, every step: 1 / 0.5 = 2 > 1.5
    assert result["elasticdnn"] == pytest.approx(0.5) and result["uniform"] == pytest.approx(0.5)


def test_the_fallback_serves_the_size_best_before_retraining():
    meas = synthetic()
    meas = ma.Measurements(meas.sizes, meas.domains, np.tile([0.1, 0.7], (4, 1)), np.tile([0.2, 0.9], (4, 1)),
                           meas.seconds, meas.flops, meas.target_means, meas.source_mean)
    train, test = ma.split_domains(4)
    estimator = ma.fit_estimator(meas, train, seed=0, epochs=FIT_EPOCHS)
    result = ma.simulate(meas, estimator, train, test, apps=2, t_max=1.5, time_factor=1.0, seed=0)
    assert result["fallbacks"] == 2 * len(test)  # nothing retrains inside 1.5 s
    # no app retrains: each serves its size's accuracy before retraining; 0.5 beats 0.2 (Uniform's size)
    assert result["oracle"] == pytest.approx(0.7) and result["uniform"] == pytest.approx(0.1)
    assert result["elasticdnn"] == pytest.approx(0.7)  # its calibrated estimates rank the sizes the same way


def test_host_rate_and_device_factors():
    meas = synthetic()
    assert ma.host_flops_per_s(meas, [0, 1]) == pytest.approx(20.0)  # 40 FLOPs / 2 s at the largest size
    cfg = RunConfig(fleet=FleetConfig())
    devices = ma.device_time_factors(cfg, 3, 20.0)
    assert devices == ma.device_time_factors(cfg, 3, 20.0)
    for device in devices:
        assert device["time_factor"] == pytest.approx(20.0 / device["flops_per_s"])


def test_compare_rows_cover_every_window_and_app_count():
    meas = synthetic(domains=6)
    train, test = ma.split_domains(6)
    estimator = ma.fit_estimator(meas, train, seed=0, epochs=FIT_EPOCHS)
    devices = [{"time_factor": 1.0}, {"time_factor": 3.0}]
    rows = ma.compare(meas, estimator, train, test, devices, 100.0, app_counts=(2, 3), window_scales=(1.0, 0.1))
    assert [(r["window_scale"], r["apps"]) for r in rows] == [(1.0, 2), (1.0, 3), (0.1, 2), (0.1, 3)]
    assert all(r["oracle"] >= r["uniform"] - 1e-12 for r in rows[:2])
    assert "ElasticDNN - Uniform" in ma.markdown({"rows": rows})


def test_measure_on_a_tiny_master_leaves_it_unchanged():
    torch.manual_seed(0)
    elastic = elastic_fbs_resnet_cpu(num_classes=3, width=4, seed=0)
    state = copy.deepcopy(elastic.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [ma.DomainBatch(f"d{i}", torch.randn(8, 3, 32, 32, generator=gen),
                              torch.randn(6, 3, 32, 32, generator=gen), torch.randint(0, 3, (6,), generator=gen))
               for i in range(2)]
    settings = RemodelSettings(epochs=1, batch_size=4)
    meas = ma.measure(elastic, batches, torch.randn(5, 3, 32, 32, generator=gen), (0.5, 1.0), settings, seed=0)
    assert meas.before.shape == meas.after.shape == meas.seconds.shape == (2, 2)
    assert np.all((meas.before >= 0) & (meas.after <= 1)) and np.all(meas.seconds > 0)
    assert np.all(meas.flops[:, 0] < meas.flops[:, 1])  # the half-size surrogate trains fewer FLOPs
    assert meas.target_means.shape == (2, 16) and meas.source_mean.shape == (16,)  # 4 x width pooled features
    for key, value in elastic.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="keep fractions"):
        ma.measure(elastic, batches, batches[0].x, (0.0,), settings, seed=0)


def test_domain_batches_follow_the_device_order():
    scenario = ScenarioConfig(name="evolving", corruptions=("fog", "snow"), severity=5, per_device_domains=True,
                              stream_batch=10, batches_per_domain=2)
    data = build_federated_data(DatasetConfig(), scenario, 2, 0)
    batches = ma.domain_batches(data, 1)
    assert [b.domain for b in batches] == list(data.device_domains(1))
    assert batches[0].x.shape == (10, 3, 32, 32) and batches[0].held_y.shape == (10,)
    assert not torch.equal(batches[0].x, batches[0].held_x)  # adapt and held-out are different batches


def test_window_of_the_papers_own_master_is_the_papers_window():
    resnet56 = build_model("fbs_resnet56", num_classes=10, width=16, in_channels=3)
    assert ma.paper_scaled_window(resnet56, 10, (3, 32, 32)) == pytest.approx(ma.PAPER_WINDOW_S)
    small = elastic_fbs_resnet_cpu(num_classes=10, width=8, seed=0).master
    assert 0 < ma.paper_scaled_window(small, 10, (3, 32, 32)) < ma.PAPER_WINDOW_S / 10


def test_virtual_work_per_method_by_hand():
    """Master-sized passes per sample: 10 epochs, a 5 % model (the client's virtual clock)."""
    assert training_passes("source", 10, 0.05) == 0.0
    assert training_passes("bn_adapt", 10, 0.05) == pytest.approx(0.05 / 3)  # one forward
    assert training_passes("tent", 10, 0.05) == pytest.approx(0.5)
    assert training_passes("shot", 10, 0.05) == pytest.approx(0.5 * (1 + 1 / 3))  # + pseudo-label forwards
    assert training_passes("full", 10, 1.0) == pytest.approx(10.0)
    assert training_passes("elasticdnn", 10, 0.05) == pytest.approx(1 / 3 + 0.5)  # master forward + surrogate
    with pytest.raises(ValueError, match="choose one of"):
        training_passes("ekya", 10, 0.05)


def test_targets_report_the_same_size_models_starting_accuracy():
    rows = rows_with(0.7, 0.5, 0.5, 1.0)
    rows["source"] = {**rows["tent"], "accuracy": 0.1}
    lines = ce.targets(rows, None)
    assert len(lines) == 3 and "scores 10.0 %" in lines[2]


def test_targets_report_the_ablation_and_the_extension_by_hand():
    rows = rows_with(0.70, 0.55, 0.60, 1.0)
    rows["elasticdnn_no_update"] = {**rows["elasticdnn"], "accuracy": 0.75}
    rows["elasticdnn_bank_fedavg"] = {**rows["elasticdnn"], "accuracy": 0.72}
    rows["elasticdnn_bn_write_back"] = {**rows["elasticdnn"], "accuracy": 0.61}
    rows["elasticdnn_sandwich_largest"] = {**rows["elasticdnn"], "accuracy": 0.58}
    lines = ce.targets(rows, None)
    assert any("master updates" in line and "-5.0 points" in line for line in lines)
    assert any("BN gamma/beta back too" in line and "-9.0 points" in line for line in lines)
    assert any("banks (extension): +2.0 points" in line for line in lines)
    assert any("master's pre-training (sandwich rule): +12.0 points" in line for line in lines)


def test_each_run_names_its_method_and_tuned_settings(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(ce, "run_cached", lambda run_dir, overrides: seen.setdefault(run_dir.name, overrides))
    args = argparse.Namespace(severity=5, width=16, partition="iid", devices=4, rounds=15, seed=0, out=tmp_path)
    for label in ce.RUNS:
        ce.run_one(label, args)
    assert "algorithm.elasticdnn.master_update=false" in seen["elasticdnn_no_update"]
    assert "algorithm.elasticdnn.bank_fedavg=true" in seen["elasticdnn_bank_fedavg"]
    assert "algorithm.elasticdnn.write_back_bn=true" in seen["elasticdnn_bn_write_back"]
    assert "algorithm.elasticdnn.sandwich=largest" in seen["elasticdnn_sandwich_largest"]
    assert {"algorithm.elasticdnn.method=tent", "algorithm.elasticdnn.lr=0.003"} <= set(seen["tent"])
    elastic = [o for o in seen["elasticdnn"] if o.startswith("algorithm.") and o.split("=")[0].endswith((".lr", ".epochs"))]
    assert len(elastic) == 2 and set(elastic) <= set(seen["full"])  # the same passes on the whole master
    assert all(any(o.startswith("algorithm.elasticdnn.method=") for o in seen[label]) for label in ce.RUNS)
