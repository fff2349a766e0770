"""ElasticDNN's multi-app comparison: measuring, scheduling, the best fitting fixed size, tables over seeds.

Schedules run on synthetic measurement tables whose window accuracies are worked out by hand;
the tables over seeds read hand-made reports (t_{0.975,2} / sqrt(3) = 2.484138).
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from experiments.claims import elastic_measure as em
from experiments.claims import elastic_multiapp
from experiments.claims import elastic_multiapp_tables as mt
from experiments.claims import elastic_schedule as es
from experiments.claims.elastic_estimate import fit_estimator, split_domains
from experiments.schema import FleetConfig, RunConfig
from models.catalog import build_model
from models.elastic.master import elastic_fbs_resnet_cpu
from models.elastic.remodel import RemodelSettings
from models.elastic.scheduler import Schedule

#: Enough full-batch Adam steps to rank two sizes on these tiny tables (the default 500 is for real runs).
FIT_EPOCHS = 100
SEEDS = [0, 1, 2]
HALF_3 = 2.484138


# --------------------------------------------------------------------------- pieces
def test_split_domains_and_app_sequences_by_hand():
    assert split_domains(15) == (list(range(7)), list(range(7, 15)))
    with pytest.raises(ValueError, match="2 domains"):
        split_domains(1)
    assert es.app_sequences([3, 4, 5], 2) == [[3, 4, 5], [4, 5, 3]]
    with pytest.raises(ValueError, match="lower the app count"):
        es.app_sequences([3, 4], 3)


def test_penultimate_features_are_the_last_linear_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    expected = torch.relu(model[0](x)).detach().double().numpy()
    np.testing.assert_allclose(em.penultimate_features(model, x), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="no nn.Linear"):
        em.penultimate_features(nn.ReLU(), x)


def plan(choice, shares, retrains, start=0.0):
    n = len(choice)
    return Schedule(choice=tuple(choice), shares=np.array(shares), retraining_time=np.zeros(n),
                    retrains=np.array(retrains), objective=0.0, feasible=True, worst_overrun=0.0,
                    iterations=0, start_time=start)


def test_check_window_is_eq_11():
    times = np.array([[1.0, 2.0], [1.0, 3.0]])
    es.check_window(plan([0, 1], [0.25, 0.75], [True, True]), times, 4.0)  # 1/0.25 = 4, 3/0.75 = 4
    es.check_window(plan([1, 1], [0.0, 1.0], [False, True]), times, 3.0)  # idle app 0 is not checked
    with pytest.raises(AssertionError, match=r"apps \[1\]"):
        es.check_window(plan([0, 1], [0.5, 0.5], [True, True]), times, 4.0)  # 3/0.5 = 6 > 4
    with pytest.raises(AssertionError, match="violates eq. 11"):
        es.check_window(plan([0, 0], [0.5, 0.5], [True, True], start=2.5), times, 4.0)  # 2.5 + 2 > 4


def synthetic(domains=4, before=(0.5, 0.5)):
    """Sizes (0.2, 0.5): A = ``before``; Ã = 0.6 / 0.9; host seconds 1 / 2; 10 / 40 FLOPs."""
    sizes = (0.2, 0.5)
    rng = np.random.default_rng(0)
    return em.Measurements(sizes, tuple(f"d{i}" for i in range(domains)), np.tile(before, (domains, 1)),
                           np.tile([0.6, 0.9], (domains, 1)), np.tile([1.0, 2.0], (domains, 1)),
                           np.tile([10.0, 40.0], (domains, 1)), rng.normal(size=(domains, 3)), np.zeros(3))


def simulated(meas, t_max, apps=2):
    train, test = split_domains(len(meas.domains))
    estimator = fit_estimator(meas, train, seed=0, epochs=FIT_EPOCHS)
    return es.simulate(meas, estimator, train, test, apps=apps, t_max=t_max, time_factor=1.0, seed=0)


# --------------------------------------------------------------------------- schedules
def test_simulate_scores_every_fixed_size_by_hand():
    result = simulated(synthetic(), t_max=100.0)
    # Uniform at 0.2: both apps with 1/2 share, busy 2 s -> (0.5 * 2 + 0.6 * 98) / 100; at 0.5: busy 4 s.
    assert result["uniform_by_size"] == pytest.approx([0.598, 0.884])
    assert result["uniform"] == pytest.approx(0.598)  # the paper's 20 % surrogate
    assert result["oracle"] == pytest.approx(0.884)  # both at 0.5, eq. 10 shares 1/2
    assert result["elasticdnn"] == pytest.approx(0.884)  # calibrated estimates rank the sizes right
    assert result["fits_by_size"] == [True, True] and result["fallbacks"] == 0
    assert result["ekya_like_by_size"][1] > result["ekya_like_by_size"][0] == result["ekya_like"]


def test_a_size_fits_only_when_every_app_finishes_at_equal_shares():
    result = simulated(synthetic(), t_max=3.0)
    # 0.5: 2 s / (1/2) = 4 s > 3 s, nobody retrains, A = 0.5 all window; 0.2: busy 2 s -> (0.5 * 2 + 0.6) / 3.
    assert result["fits_by_size"] == [True, False]
    assert result["uniform_by_size"] == pytest.approx([1.6 / 3, 0.5])


def test_best_fixed_size_by_hand():
    assert es.best_fixed_size([0.598, 0.884], [True, True]) == 1
    assert es.best_fixed_size([0.53, 0.5], [True, False]) == 0
    assert es.best_fixed_size([0.4, 0.7, 0.9], [True, True, False]) == 1  # 0.9 does not fit
    assert es.best_fixed_size([0.4, 0.7], [False, False]) == 1  # none fits: the best of all
    with pytest.raises(ValueError, match="one score and one fit flag per size"):
        es.best_fixed_size([0.4], [True, False])


def test_compare_reports_the_best_fitting_size_and_the_scheduler_gain_over_it():
    meas = synthetic(domains=4)
    train, test = split_domains(4)
    estimator = fit_estimator(meas, train, seed=0, epochs=FIT_EPOCHS)
    devices = [{"time_factor": 1.0}, {"time_factor": 1.5}]
    rows = es.compare(meas, estimator, train, test, devices, 100.0, app_counts=(2,), window_scales=(1.0, 0.03))
    wide, tight = rows
    assert wide["fitting_sizes"] == [0.2, 0.5] and wide["uniform_best_size"] == 0.5
    assert wide["uniform_best"] == pytest.approx(wide["elasticdnn"])  # same size chosen: no gain beyond it
    assert wide["uniform"] < wide["uniform_best"]  # at 0.2 Uniform only shows the size choice
    # t_max = 3 s: at factor 1.5 even 0.2 takes 1.5 / (1/2) = 3 s (fits), 0.5 takes 6 s (does not)
    assert tight["fitting_sizes"] == [0.2] and tight["uniform_best_size"] == 0.2 and not tight["none_fits"]
    assert tight["ekya_like_best_size"] == 0.2
    with pytest.raises(ValueError, match="BASELINE_SIZE"):
        simulated(dataclasses.replace(synthetic(), sizes=(0.3, 0.5)), t_max=100.0)


def test_simulate_falls_back_when_nothing_fits_the_window():
    result = simulated(synthetic(), t_max=1.5)
    assert result["fallbacks"] == 2 * 2  # ElasticDNN and the oracle, both held-out steps: 1 / 0.5 = 2 > 1.5
    assert result["elasticdnn"] == pytest.approx(0.5) and result["uniform"] == pytest.approx(0.5)
    assert result["fits_by_size"] == [False, False]


def test_the_fallback_serves_the_size_best_before_retraining():
    result = simulated(synthetic(before=(0.1, 0.7)), t_max=1.5)
    # no app retrains: each serves its size's accuracy before retraining; 0.5 beats 0.2
    assert result["oracle"] == pytest.approx(0.7) and result["uniform"] == pytest.approx(0.1)
    assert result["elasticdnn"] == pytest.approx(0.7)


def test_host_rate_and_device_factors():
    meas = synthetic()
    assert es.host_flops_per_s(meas, [0, 1]) == pytest.approx(20.0)  # 40 FLOPs / 2 s at the largest size
    cfg = RunConfig(fleet=FleetConfig())
    devices = es.device_time_factors(cfg, 3, 20.0)
    assert devices == es.device_time_factors(cfg, 3, 20.0)
    for device in devices:
        assert device["time_factor"] == pytest.approx(20.0 / device["flops_per_s"])


def test_window_of_the_papers_own_master_is_the_papers_window():
    resnet56 = build_model("fbs_resnet56", num_classes=10, width=16, in_channels=3)
    assert es.paper_scaled_window(resnet56, 10, (3, 32, 32)) == pytest.approx(es.PAPER_WINDOW_S)
    small = elastic_fbs_resnet_cpu(num_classes=10, width=8, seed=0).master
    assert 0 < es.paper_scaled_window(small, 10, (3, 32, 32)) < es.PAPER_WINDOW_S / 10


# --------------------------------------------------------------------------- measuring
def test_measure_on_a_tiny_master_counts_flops_and_leaves_it_unchanged():
    torch.manual_seed(0)
    elastic = elastic_fbs_resnet_cpu(num_classes=3, width=4, seed=0)
    state = copy.deepcopy(elastic.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [em.DomainBatch(f"d{i}", torch.randn(8, 3, 32, 32, generator=gen),
                              torch.randn(6, 3, 32, 32, generator=gen), torch.randint(0, 3, (6,), generator=gen))
               for i in range(2)]
    settings = RemodelSettings(epochs=1, batch_size=4)
    meas = em.measure(elastic, batches, torch.randn(5, 3, 32, 32, generator=gen), (0.5, 1.0), settings, seed=0)
    assert meas.before.shape == meas.after.shape == meas.seconds.shape == (2, 2)
    assert np.all((meas.before >= 0) & (meas.after <= 1)) and np.all(meas.seconds > 0)
    assert np.all(meas.flops[:, 0] < meas.flops[:, 1])  # the half-size surrogate runs fewer FLOPs
    assert meas.target_means.shape == (2, 16) and meas.source_mean.shape == (16,)  # 4 x width pooled features
    for key, value in elastic.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="keep fractions"):
        em.measure(elastic, batches, batches[0].x, (0.0,), settings, seed=0)


# --------------------------------------------------------------------------- tables over seeds
def report(elastic, uniform, uniform_best, best_size=0.5, none_fits=False):
    """A report of one seed with one (window x1, 2 apps) cell; Ekya-like equal to Uniform."""
    row = {"window_scale": 1.0, "t_max_s": 100.0, "apps": 2, "fallbacks": 1, "none_fits": none_fits,
           "elasticdnn": elastic, "uniform": uniform, "ekya_like": uniform, "oracle": 0.95,
           "uniform_best": uniform_best, "ekya_like_best": uniform_best, "uniform_best_size": best_size,
           "ekya_like_best_size": best_size, "fitting_sizes": [0.2, 0.5]}
    return {"sizes": [0.2, 0.5], "domains": ["a", "b"], "train_domains": ["a"], "test_domains": ["b"],
            "measured": {"before": [[0.5, 0.6]], "after": [[0.6, 0.8]], "seconds": [[1.0, 2.0]],
                         "flops": [[1e9, 3e9]]},
            "host_flops_per_s": 2e9, "window_s": 100.0, "devices": [{"device_class": "phone_3gb"}],
            "estimator_mae": dict.fromkeys(("before_raw", "after_raw", "before_calibrated", "after_calibrated"), 0.05),
            "rows": [row]}


def reports():
    """ElasticDNN beats Uniform @0.2 by 5 points at every seed; the best fitting size by 0, 1, -1 points.

    Unpaired, the same numbers would differ: 88, 89, 90 minus 85, 83, 84 are 3, 6, 6 points.
    """
    return {0: report(0.90, 0.85, 0.90), 1: report(0.88, 0.83, 0.87), 2: report(0.89, 0.84, 0.90, 0.3, True)}


def test_multiapp_table_pairs_the_gains_per_seed_by_hand():
    table = mt.multiapp_table(reports(), SEEDS)
    cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert cells[:2] == ["100.0 s (x1)", "2"]
    assert cells[2] == f"89.0 ± {HALF_3:.1f} (n=3)"  # 90, 88, 89
    assert cells[8] == "5.0 ± 0.0"  # ElasticDNN - Uniform @0.2: 5, 5, 5 (paired per seed)
    assert cells[10] == f"0.0 ± {HALF_3:.1f}"  # ElasticDNN - Uniform @best: 0, 1, -1
    assert cells[12] == "0.5/0.5/0.3*; 0.5/0.5/0.3*" and cells[13] == "3"


def test_multiapp_targets_judge_the_scheduler_on_paired_intervals():
    paper, best_uniform, best_ekya = mt.multiapp_targets(reports(), SEEDS)
    assert "Uniform at the 20 % surrogate" in paper and "5.0 ± 0.0 points (n=3;" in paper and "**met**" in paper
    assert f"0.0 ± {HALF_3:.1f} points (n=3; target >= 0.0 points): **undecided**" in best_uniform
    assert "best single size" in best_ekya and "**undecided**" in best_ekya
    missing = {0: reports()[0], 1: None, 2: None}
    assert "(n=1;" in mt.multiapp_targets(missing, SEEDS)[0]


def test_multiapp_section_states_the_method_and_survives_missing_reports():
    lines = mt.multiapp_section(reports(), SEEDS)
    text = "\n".join(lines)
    assert "Student-t" in text and "best single size that fits the window" in text
    assert "| 0.5 | 60.0 ± 0.0 (n=3) | 80.0 ± 0.0 (n=3) | 2.00 ± 0.00 (n=3) | 3.00 ± 0.00 (n=3) |" in text
    assert "not measured" in "\n".join(mt.multiapp_section({0: None}, [0]))
    assert sum("scheduler vs" in line for line in lines) == 3
    assert not any("scheduler vs" in line for line in mt.multiapp_section(reports(), SEEDS, with_targets=False))


def test_the_comparison_alone_with_no_run_measures_nothing(tmp_path, capsys):
    assert elastic_multiapp.main(["--out", str(tmp_path), "--seeds", "0", "1", "--no-run"]) == 0
    out, err = capsys.readouterr()
    assert "not measured" in out and "no completed ElasticDNN run" in err
    assert list(tmp_path.iterdir()) == []
