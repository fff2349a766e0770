"""ElasticDNN III-C: accuracy estimator + calibration (eq. 5-7), scheduler (eq. 8-11), baselines."""

import math

import numpy as np
import pytest

from models.elastic.estimator import (
    MIN_DOMAIN_DISTANCE,
    AccuracyEstimator,
    calibrate,
    calibration_weights,
    domain_distance,
    domain_representation,
    estimator_inputs,
)
from models.elastic.scheduler import (
    Schedule,
    ekya_like_schedule,
    evolutionary_search,
    exhaustive_search,
    objective,
    shares,
    uniform_schedule,
    window_accuracy,
)

# Hand-worked n = 2 apps x C = 2 sizes (values in the comments of each test).
S = np.array([[0.25, 0.5], [0.25, 0.75]])
T = np.array([[1.0, 2.0], [1.0, 3.0]])
A = np.array([[0.5, 0.6], [0.4, 0.5]])
A_TILDE = np.array([[0.7, 0.9], [0.8, 0.9]])


def random_instance(rng, n_apps, n_sizes):
    """Bigger models: more accurate, slower to retrain; windows from generous to too short."""
    s = np.sort(rng.uniform(0.1, 1.0, size=(n_apps, n_sizes)), axis=1)
    t = s * rng.uniform(1.0, 5.0, size=(n_apps, 1)) + rng.uniform(0.0, 0.5, size=(n_apps, n_sizes))
    a = np.clip(rng.uniform(0.2, 0.6, size=(n_apps, n_sizes)) + 0.2 * s, 0, 1)
    a_tilde = np.clip(a + rng.uniform(-0.05, 0.35, size=(n_apps, n_sizes)), 0, 1)
    t_max = rng.uniform(0.5, 2.5) * n_apps * t.mean()
    return a, a_tilde, t, s, t_max


def assert_eq11(plan: Schedule, t, t_max):
    """Eq. 11 on every retraining app of a feasible plan; shares never exceed the whole."""
    assert plan.shares.sum() <= 1 + 1e-9
    if plan.feasible:
        busy = plan.start_time + plan.retraining_time[plan.retrains]
        assert np.all(busy <= t_max * (1 + 1e-9))
        assert plan.worst_overrun <= 1e-9 * t_max


# ---------------------------------------------------------------- estimator: eq. 5-7

def test_calibration_by_hand_two_past_domains():
    # dis = (1, 0.5) -> 1/dis = (1, 2) -> sigma = (1/(1+e), e/(1+e)) = (0.268941, 0.731059)
    sigma = calibration_weights([1.0, 0.5])
    assert sigma == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)])
    # A = 0.5*0.6 + 0.5*(0.268941*0.4 + 0.731059*0.8) = 0.646212
    # Ã = 0.5*0.7 + 0.5*(0.268941*0.9 + 0.731059*0.5) = 0.653788
    before, after = calibrate(0.6, 0.7, [1.0, 0.5], [0.4, 0.8], [0.9, 0.5])
    assert float(before) == pytest.approx(0.646212, abs=1e-6)
    assert float(after) == pytest.approx(0.653788, abs=1e-6)


def test_calibration_per_model_size_and_no_past():
    pred_a, pred_at = np.array([0.2, 0.4]), np.array([0.5, 0.9])
    past_a = np.array([[0.4, 0.6], [0.0, 0.0]])
    past_at = np.array([[0.7, 1.0], [0.0, 0.0]])
    # equal distances -> sigma = (1/2, 1/2): A = 0.5*pred + 0.25*past_row0
    before, after = calibrate(pred_a, pred_at, [2.0, 2.0], past_a, past_at)
    assert before == pytest.approx([0.2, 0.35])
    assert after == pytest.approx([0.425, 0.7])
    unchanged = calibrate(pred_a, pred_at, [], np.empty((0, 2)), np.empty((0, 2)))
    assert unchanged[0] == pytest.approx(pred_a) and unchanged[1] == pytest.approx(pred_at)


def test_identical_past_domain_takes_all_weight():
    assert MIN_DOMAIN_DISTANCE > 0
    before, after = calibrate(0.6, 0.7, [0.0, 0.3], [0.2, 0.9], [1.0, 0.1])
    assert float(before) == pytest.approx(0.5 * 0.6 + 0.5 * 0.2, abs=1e-12)
    assert float(after) == pytest.approx(0.5 * 0.7 + 0.5 * 1.0, abs=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(dist_to_past=[1.0, -0.1]),                      # negative distance
    dict(past_before=[[0.4, 0.8]]),                      # wrong past shape
    dict(pred_before=60.0),                              # percent, not fraction
])
def test_calibration_bad_input(kwargs):
    args = dict(pred_before=0.6, pred_after=0.7, dist_to_past=[1.0, 0.5],
                past_before=[0.4, 0.8], past_after=[0.9, 0.5])
    args.update(kwargs)
    with pytest.raises(ValueError):
        calibrate(**args)


def test_domain_representation_and_distance():
    source = np.array([[0.0, 0.0], [2.0, 0.0]])  # mean (1, 0)
    target = np.array([[4.0, 4.0]])              # mean (4, 4)
    assert domain_representation(source, target) == pytest.approx([1, 0, 4, 4])
    assert domain_distance(np.array([1.0, 0.0]), np.array([4.0, 4.0])) == pytest.approx(5.0)
    assert domain_distance(np.array([1.0, 0.0]), np.array([0.0, 3.0]), metric="cosine") == pytest.approx(1.0)
    assert domain_distance(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    with pytest.raises(ValueError):
        domain_representation(source, np.ones((3, 5)))
    with pytest.raises(ValueError):
        domain_distance(np.ones(2), np.ones(2), metric="manhattan")
    rows = estimator_inputs([0.2, 0.5], 5.0, [1, 0, 4, 4])
    assert rows.tolist() == [[0.2, 5, 1, 0, 4, 4], [0.5, 5, 1, 0, 4, 4]]


def synthetic_runs(rng, count):
    """Accuracy rises with the remodel ratio s and falls with the domain distance."""
    s = rng.uniform(0.1, 1.0, count)
    dis = rng.uniform(0.0, 2.0, count)
    rep = rng.normal(size=(count, 4))
    before = 0.3 + 0.4 * s - 0.1 * dis
    after = before + 0.2 * s + 0.05
    return np.column_stack([s, dis, rep]), np.column_stack([before, after])


def test_estimator_learns_a_simple_relation():
    rng = np.random.default_rng(0)
    x_train, y_train = synthetic_runs(rng, 200)
    x_test, y_test = synthetic_runs(rng, 50)
    estimator = AccuracyEstimator(input_dim=6).fit(x_train, y_train, epochs=200, lr=1e-2, seed=0)
    assert estimator.loss_history[-1] < estimator.loss_history[0] / 10
    prediction = estimator.predict(x_test)
    assert prediction.shape == (50, 2)
    assert np.all((prediction >= 0) & (prediction <= 1))
    assert np.abs(prediction - y_test).mean() < 0.03
    sweep = np.column_stack([np.linspace(0.1, 1.0, 5), np.full(5, 1.0), np.zeros((5, 4))])
    assert np.all(np.diff(estimator.predict(sweep), axis=0) > 0)  # both outputs grow with s


def test_estimator_is_seeded_and_checks_input():
    rng = np.random.default_rng(1)
    x, y = synthetic_runs(rng, 40)
    first = AccuracyEstimator(6).fit(x, y, epochs=20, seed=3).predict(x)
    again = AccuracyEstimator(6).fit(x, y, epochs=20, seed=3).predict(x)
    other = AccuracyEstimator(6).fit(x, y, epochs=20, seed=4).predict(x)
    assert np.array_equal(first, again) and not np.allclose(first, other)
    with pytest.raises(RuntimeError):
        AccuracyEstimator(6).predict(x)
    with pytest.raises(ValueError):
        AccuracyEstimator(6).fit(x[:, :5], y)
    with pytest.raises(ValueError):
        AccuracyEstimator(6).fit(x, y * 100)  # percent targets


# ---------------------------------------------------------------- scheduler: eq. 8-11

def test_objective_eq8_eq10_by_hand():
    # choice (1, 0): s = (0.5, 0.25) -> lambda = (2/3, 1/3) (eq. 10); t = (2/(2/3), 1/(1/3)) = (3, 3)
    assert shares([1, 0], S) == pytest.approx([2 / 3, 1 / 3])
    # t_max = 10: app0 0.6*3 + 0.9*7 = 8.1, app1 0.4*3 + 0.8*7 = 6.8 -> 14.9
    assert objective([1, 0], A, A_TILDE, T, S, 10.0) == pytest.approx(14.9)
    # (0,0): lambda (1/2, 1/2), t = (2, 2): 0.5*2+0.7*8 + 0.4*2+0.8*8 = 13.8
    assert objective([0, 0], A, A_TILDE, T, S, 10.0) == pytest.approx(13.8)
    # (1,1): lambda (0.4, 0.6), t = (5, 5): 0.6*5+0.9*5 + 0.5*5+0.9*5 = 14.5
    assert objective([1, 1], A, A_TILDE, T, S, 10.0) == pytest.approx(14.5)
    # t_max = 4: (1,1) needs t = 5 > 4, eq. 11 violated
    assert objective([1, 1], A, A_TILDE, T, S, 4.0) == -math.inf
    assert objective([0, 0], A, A_TILDE, T, S, 4.0) == pytest.approx(4.8)  # 2.4 + 2.4


def test_faster_retraining_scores_higher():
    """Guards the corrected eq. 8: Ã counts after retraining, so the same gain sooner is better."""
    a, a_tilde, s = np.full((1, 2), 0.5), np.full((1, 2), 0.9), np.full((1, 2), 0.5)
    t = np.array([[1.0, 5.0]])
    assert objective([0], a, a_tilde, t, s, 10.0) > objective([1], a, a_tilde, t, s, 10.0)
    assert exhaustive_search(a, a_tilde, t, s, 10.0).choice == (0,)


@pytest.mark.parametrize("t_max, best, value", [(10.0, (1, 0), 14.9), (4.0, (0, 0), 4.8)])
def test_searches_find_the_hand_optimum(t_max, best, value):
    for plan in (exhaustive_search(A, A_TILDE, T, S, t_max), evolutionary_search(A, A_TILDE, T, S, t_max, seed=0)):
        assert plan.choice == best and plan.feasible
        assert plan.objective == pytest.approx(value)
        assert plan.retraining_time == pytest.approx(T[[0, 1], list(best)] / plan.shares)
        assert t_max * window_accuracy(plan, A, A_TILDE, T, S, t_max).sum() == pytest.approx(value)


def test_infeasible_instance_returns_least_overrun_plan():
    # t_max = 1.5: worst overruns (0,0) 0.5, (1,0) 1.5, (0,1) 2.5, (1,1) 3.5
    for plan in (exhaustive_search(A, A_TILDE, T, S, 1.5), evolutionary_search(A, A_TILDE, T, S, 1.5, seed=1)):
        assert not plan.feasible and plan.objective == -math.inf
        assert plan.choice == (0, 0) and plan.worst_overrun == pytest.approx(0.5)
        # nobody finishes: each app serves its before-retraining accuracy all window long
        assert window_accuracy(plan, A, A_TILDE, T, S, 1.5) == pytest.approx([0.5, 0.4])


def test_evolutionary_matches_exhaustive_on_small_instances():
    rng = np.random.default_rng(2024)
    infeasible = 0
    for case in range(100):
        problem = random_instance(rng, int(rng.integers(1, 4)), int(rng.integers(1, 5)))
        exact, found = exhaustive_search(*problem), evolutionary_search(*problem, seed=case)
        assert found.feasible == exact.feasible
        if exact.feasible:
            assert found.objective == pytest.approx(exact.objective, rel=1e-12)
        else:
            infeasible += 1
            assert found.worst_overrun == pytest.approx(exact.worst_overrun, rel=1e-12)
    assert 0 < infeasible < 100  # both regimes were exercised


def test_every_plan_satisfies_eq11_on_random_instances():
    rng = np.random.default_rng(7)
    feasible = 0
    for case in range(200):
        problem = random_instance(rng, int(rng.integers(1, 5)), int(rng.integers(1, 9)))
        t, t_max = problem[2], problem[4]
        size = int(rng.integers(0, problem[0].shape[1]))
        plans = [evolutionary_search(*problem, seed=case), uniform_schedule(*problem, size),
                 ekya_like_schedule(*problem, size)]
        for plan in plans:
            assert_eq11(plan, t, t_max)
            if plan.feasible:
                total = t_max * window_accuracy(plan, *problem).sum()
                assert total == pytest.approx(plan.objective)
        feasible += plans[0].feasible
    assert 0 < feasible < 200


def test_evolutionary_search_is_deterministic():
    problem = random_instance(np.random.default_rng(5), 4, 8)
    first, again = evolutionary_search(*problem, seed=11), evolutionary_search(*problem, seed=11)
    assert first == again and np.array_equal(first.shares, again.shares)


def test_uniform_baseline_by_hand():
    # size 1, lambda = 1/2, t_max = 4: t = (4, 6); app0 retrains (0.6*4 + 0.9*0 = 2.4),
    # app1 cannot finish and serves A = 0.5 all window (2.0): total 4.4
    plan = uniform_schedule(A, A_TILDE, T, S, 4.0, size_index=1)
    assert plan.shares == pytest.approx([0.5, 0.5]) and plan.retrains.tolist() == [True, False]
    assert plan.objective == pytest.approx(4.4) and plan.feasible
    assert window_accuracy(plan, A, A_TILDE, T, S, 4.0) == pytest.approx([0.6, 0.5])


def test_ekya_like_baseline_by_hand():
    # size 0, T = (1, 1), t_max = 4, steps of 1/4: per-unit gains app1 (Ã - A larger) lead:
    # +2 units to app1 (gain 0.8 / 2), then +1 (0.267), then +1 (0.133); app0 never gains more.
    plan = ekya_like_schedule(A, A_TILDE, T, S, 4.0, size_index=0, share_step=0.25)
    assert plan.shares == pytest.approx([0.0, 1.0]) and plan.iterations == 3
    assert plan.retrains.tolist() == [False, True]
    assert plan.objective == pytest.approx(0.5 * 4 + (0.4 * 1 + 0.8 * 3))  # 4.8
    # profiling for 2 of the 4 time units: app1 at full share busy 2 + 1 = 3 -> 0.4*3 + 0.8*1
    profiled = ekya_like_schedule(A, A_TILDE, T, S, 4.0, size_index=0, share_step=0.25, profiling_time=2.0)
    assert profiled.shares == pytest.approx([0.0, 1.0]) and profiled.objective == pytest.approx(2.0 + 2.0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="T has shape"):
        objective([0, 0], A, A_TILDE, np.ones((2, 3)), S, 4.0)
    with pytest.raises(ValueError):
        evolutionary_search(A[0], A_TILDE[0], T[0], S[0], 4.0)  # 1-D tables
    with pytest.raises(ValueError):
        objective([0], A, A_TILDE, T, S, 4.0)  # one size for two apps
    with pytest.raises(ValueError):
        objective([0, 2], A, A_TILDE, T, S, 4.0)  # size index out of range
    with pytest.raises(ValueError):
        exhaustive_search(A, A_TILDE, T, np.zeros_like(S), 4.0)  # zero remodel ratio
    with pytest.raises(ValueError):
        uniform_schedule(A, A_TILDE, T, S, 0.0, size_index=0)  # empty window
    with pytest.raises(ValueError):
        uniform_schedule(A, A_TILDE, T, S, 4.0, size_index=2)
    with pytest.raises(ValueError):
        ekya_like_schedule(A, A_TILDE, T, S, 4.0, size_index=0, share_step=0.3)
    with pytest.raises(ValueError):
        evolutionary_search(A, A_TILDE, T, S, 4.0, mutation_prob=1.5)

