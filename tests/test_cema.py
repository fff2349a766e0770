"""CEMA's pure-torch pieces: upload filter, replay buffer, cloud steps (values by hand)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from models.cema.cloud import (
    REPLAY_MIN_SIZE,
    ReplayBuffer,
    adapt_foundation,
    bn_sgd,
    distill,
    distillation_loss,
)
from models.cema.edge_batch import CloudSettings, Student, Teacher, process_edge_batch
from models.cema.filter import UploadFilter, default_e_max0
from models.cema.tbr import BATCH, TBR, reset_statistics
from models.losses import prediction_entropy

torch.set_num_threads(1)
LN2, LN4 = math.log(2), math.log(4)


def _probs_logits(*rows):
    """Logits whose softmax is exactly the given probability rows."""
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def _uniform_over(k, c=4):
    """A logit row uniform over the first k of c classes, -inf elsewhere (entropy ln k)."""
    return [0.0] * k + [-math.inf] * (c - k)


def _h(*p):
    return -sum(q * math.log(q) for q in p if q > 0)


# --- upload filter ---------------------------------------------------------------------


def test_filter_keeps_exactly_the_samples_between_the_thresholds():
    # C = 2: E_max^0 = 0.4 ln 2 = 0.2773, E_min = 0.02 ln 2 = 0.0139 (the poster's E_min).
    f = UploadFilter(2, e_min_fraction=0.02)
    assert f.e_max0 == pytest.approx(0.4 * LN2) and f.e_min == pytest.approx(0.02 * LN2)
    rows = [(0.5, 0.5), (0.9, 0.1), (0.95, 0.05), (0.99, 0.01), (0.999, 0.001)]
    # entropies 0.693 (too high), 0.325 (too high), 0.199 (keep), 0.056 (keep), 0.0079 (too low)
    assert [_h(*r) for r in rows] == pytest.approx([0.6931, 0.3251, 0.1985, 0.0560, 0.0079], abs=1e-4)
    keep = f.select(_probs_logits(*rows))
    assert keep.tolist() == [False, False, True, True, False]


def test_defaults_are_the_published_setting():
    # official tools/results.txt: "E_min=0.02, lambda=1.0"; warm-up: 10 batches of 64 (ours).
    f = UploadFilter(2)
    assert f.e_min == pytest.approx(0.02 * LN2) and f.threshold_coeff == 1.0 and f.warmup_samples == 640


def test_the_repositorys_example_conf_has_no_lower_bound_and_no_warm_up():
    # conf/cema.conf: ent_low_margin null, warm_up_batch_size null -> E_max^t = E_max^0 forever.
    f = UploadFilter(2, e_min_fraction=None, threshold_coeff=0.6, warmup_samples=None)
    assert f.e_min is None and f.warmup_samples is None and f.threshold_coeff == 0.6
    rows = [(0.5, 0.5), (0.95, 0.05), (0.999, 0.001), (1.0, 0.0)]  # the last two: entropy 0.0079 and 0
    assert f.select(_probs_logits(*rows)).tolist() == [False, True, True, True]
    for _ in range(20):
        f.select(torch.zeros(64, 2))
    assert f.reference_mean is None and f.threshold == pytest.approx(0.4 * LN2)


def test_dynamic_threshold_follows_the_rule_on_a_scripted_sequence():
    f = UploadFilter(4, threshold_coeff=0.5, warmup_samples=4)
    e0 = 0.4 * LN4  # = 0.8 ln 2
    f.select(torch.tensor([_uniform_over(4), _uniform_over(4)]))  # entropies ln4, ln4; 2 samples seen
    assert f.reference_mean is None and f.threshold == pytest.approx(e0)  # no lambda during warm-up
    f.select(torch.tensor([_uniform_over(2), _uniform_over(2)]))  # ln2, ln2; warm-up ends at 4
    assert f.reference_mean == pytest.approx(1.5 * LN2)  # (4 ln2 + 2 ln2) / 4
    assert f.threshold == pytest.approx(0.5 * e0)  # ratio 1
    f.select(torch.tensor([_uniform_over(1), _uniform_over(1)]))  # 0, 0; mean 6 ln2 / 6 = ln2
    assert f.mean_entropy == pytest.approx(LN2)
    assert f.threshold == pytest.approx(0.5 * e0 * LN2 / (1.5 * LN2))
    assert f.reference_mean == pytest.approx(1.5 * LN2)  # frozen


def test_threshold_uses_the_current_batch_in_the_mean():
    # Warm-up ends after 2 uniform samples (reference ln4). Next batch: entropies
    # h(0.9, 0.1) = 0.3251 and h(0.85, 0.15) = 0.4227 -> mean (2 ln4 + 0.7478) / 4 = 0.8801,
    # E_max^t = 0.4 ln4 * 0.8801 / ln4 = 0.3520: the first is kept, the second dropped (it
    # would be kept at 0.4 ln4 = 0.5545 if the current batch were left out of the mean).
    f = UploadFilter(4, warmup_samples=2, threshold_coeff=1.0)
    assert f.select(torch.zeros(2, 4)).tolist() == [False, False]  # ln4 > E_max^0
    keep = f.select(_probs_logits((0.9, 0.1, 0.0, 0.0), (0.85, 0.15, 0.0, 0.0)))
    assert f.threshold == pytest.approx(0.4 * (2 * LN4 + _h(0.9, 0.1) + _h(0.85, 0.15)) / 4)
    assert f.threshold == pytest.approx(0.3520, abs=1e-4)
    assert keep.tolist() == [True, False]


def test_redundancy_filter_drops_a_sample_identical_to_the_history():
    f = UploadFilter(4)
    p0 = (0.97, 0.01, 0.01, 0.01)  # entropy 0.168, inside (0.028, 0.555)
    p1 = (0.01, 0.97, 0.01, 0.01)  # cos with p0 = 0.0196 / 0.9412 = 0.0208 < 0.05
    assert f.select(_probs_logits(p0)).tolist() == [True]  # no history yet: kept
    assert f.history.tolist() == pytest.approx(list(p0))
    keep = f.select(_probs_logits(p0, p1))
    assert keep.tolist() == [False, True]
    assert f.history.tolist() == pytest.approx([0.9 * a + 0.1 * b for a, b in zip(p0, p1)])


def test_history_is_unchanged_when_nothing_is_kept():
    f = UploadFilter(4)
    p0 = (0.97, 0.01, 0.01, 0.01)
    f.select(_probs_logits(p0))
    assert f.select(_probs_logits(p0, p0)).tolist() == [False, False]
    assert f.select(torch.zeros(3, 4)).tolist() == [False] * 3  # no entropy survivor at all
    assert f.history.tolist() == pytest.approx(list(p0))


def test_filter_state_round_trips_through_plain_numbers():
    rng = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 4, generator=rng) * 3 for _ in range(6)]
    a = UploadFilter(4, warmup_samples=20)
    for b in batches[:3]:
        a.select(b)
    state = a.state_dict()
    for value in state.values():
        assert isinstance(value, (int, float, bool, list))
    assert all(isinstance(v, float) for v in state["history"]) and state["warmed_up"] is True
    b_filter = UploadFilter(4, warmup_samples=20)
    b_filter.load_state_dict({**state, "history": np.asarray(state["history"])})  # numpy arrays too
    for b in batches[3:]:
        assert torch.equal(a.select(b), b_filter.select(b))
        assert a.threshold == b_filter.threshold
    assert a.state_dict() == b_filter.state_dict()


def test_fresh_filter_state_round_trips():
    state = UploadFilter(3).state_dict()
    f = UploadFilter(3)
    f.load_state_dict(state)
    assert f.history is None and f.reference_mean is None and f.samples_seen == 0


def test_filter_rejects_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        UploadFilter(1)
    with pytest.raises(ValueError, match="e_min_fraction"):
        UploadFilter(4, e_min_fraction=0.5)
    with pytest.raises(ValueError, match="threshold_coeff"):
        UploadFilter(4, threshold_coeff=0.0)
    with pytest.raises(ValueError, match="warmup_samples"):
        UploadFilter(4, warmup_samples=0)
    with pytest.raises(ValueError, match="e_max_fraction"):
        UploadFilter(4, e_max_fraction=1.5)
    with pytest.raises(ValueError, match="cosine_margin"):
        UploadFilter(4, cosine_margin=0.0)
    with pytest.raises(ValueError, match="history_momentum"):
        UploadFilter(4, history_momentum=1.0)
    with pytest.raises(ValueError, match="does not match"):
        UploadFilter(4).select(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="same num_classes"):
        UploadFilter(4).load_state_dict(UploadFilter(3).state_dict())


# --- replay buffer ---------------------------------------------------------------------


def test_replay_buffer_evicts_oldest_first():
    buf = ReplayBuffer(capacity=3)
    buf.add(torch.tensor([[0.0], [1.0]]))
    buf.add(torch.tensor([[2.0], [3.0], [4.0]]))
    assert len(buf) == 3
    held = buf.sample(3, np.random.default_rng(0))
    assert sorted(held.flatten().tolist()) == [2.0, 3.0, 4.0]


def test_replay_sampling_is_uniform_without_replacement_and_seeded():
    buf = ReplayBuffer(capacity=10)
    buf.add(torch.arange(10.0).unsqueeze(1))
    expected = np.random.default_rng([7, 1]).choice(10, size=4, replace=False)
    got = buf.sample(4, np.random.default_rng([7, 1])).flatten()
    assert got.tolist() == [float(i) for i in expected]
    assert torch.equal(got, buf.sample(4, np.random.default_rng([7, 1])).flatten())
    assert len(set(got.tolist())) == 4


def test_replay_rejects_bad_requests():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    buf = ReplayBuffer(5)
    buf.add(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="n=3"):
        buf.sample(3, np.random.default_rng(0))


# --- distillation loss -----------------------------------------------------------------


def test_distillation_loss_matches_hand_computation():
    student = torch.log(torch.tensor([[0.5, 0.5], [0.75, 0.25]]))
    teacher = torch.log(torch.tensor([[0.75, 0.25], [0.2, 0.8]]))
    e0 = 0.4 * LN2
    h_s = [LN2, _h(0.75, 0.25)]
    h_t = [_h(0.75, 0.25), _h(0.2, 0.8)]
    kl = [
        0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),  # KL(teacher || student), row 1
        0.2 * math.log(0.2 / 0.75) + 0.8 * math.log(0.8 / 0.25),  # row 2
    ]
    ce = [-math.log(0.5), -math.log(0.25)]  # pseudo-labels 0 and 1
    expected = sum(
        3 * math.exp(e0 - h_s[i]) * h_s[i] + 3 * math.exp(e0 - h_t[i]) * kl[i] + 1 * math.exp(e0 - h_t[i]) * ce[i]
        for i in range(2)
    ) / 2
    # on paper: ENT terms 1.3719 + 1.2686, KL terms 0.2951 + 1.5988, CE terms 0.5212 + 1.1090
    assert expected == pytest.approx(6.1646 / 2, abs=1e-4)
    assert distillation_loss(student, teacher, e0).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_loss_temperature_and_no_teacher_gradient():
    student = torch.tensor([[1.0, -1.0, 0.5]], requires_grad=True)
    teacher = torch.tensor([[0.2, 0.3, -0.4]], requires_grad=True)
    # With a = c = 0, the loss is w_t * T^2 * KL at temperature T.
    t = 2.0
    p_t, log_p_s = (teacher / t).softmax(-1), (student / t).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum()
    w_t = math.exp(0.1 - prediction_entropy(teacher, log_space=True).item())
    loss = distillation_loss(student, teacher, 0.1, a=0.0, b=1.0, c=0.0, temperature=t)
    assert loss.item() == pytest.approx(w_t * t**2 * kl.item(), rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="both be"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)


# --- cloud steps -----------------------------------------------------------------------


def _tiny_net(seed=0, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, classes)
    )


def _images(n, seed):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_adapt_foundation_changes_only_bn_affine_parameters():
    net = _tiny_net().eval()
    before = {k: v.clone() for k, v in net.named_parameters()}
    adapt_foundation(net, _images(32, 1), default_e_max0(4), bn_sgd(net, lr=0.1))
    for name, p in net.named_parameters():
        if name.startswith("1."):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
            assert p.grad is None and p.requires_grad
    assert not net.training and not net[1].training  # modes restored


def _source_statistics(net, mean=0.7, var=3.0):
    """Give ``net``'s BN layer source statistics far from any batch's (a trained source model)."""
    with torch.no_grad():
        net[1].running_mean.fill_(mean)
        net[1].running_var.fill_(var)
        net[1].num_batches_tracked.fill_(100)
    return net


@pytest.mark.parametrize("bn", [TBR, BATCH])
def test_the_teacher_never_normalises_with_the_source_statistics(bn):
    # The official teacher runs with TBR statistics set from the first batch it sees (TBR) or
    # with batch statistics; the source running statistics (mean 0.7, var 3) never enter.
    student, teacher = _tiny_net(0), _source_statistics(_tiny_net(1))
    if bn == TBR:
        reset_statistics(teacher)
    x = _images(32, 3)
    with torch.no_grad():
        source_view = copy.deepcopy(teacher).eval()(x)  # a plain eval-mode teacher: the source statistics
    step = distill(student, teacher, x, bn_sgd(student, lr=2.5e-3), default_e_max0(4), bn)
    h = teacher[0](x)
    mean, var = h.mean(dim=(0, 2, 3), keepdim=True), h.var(dim=(0, 2, 3), keepdim=True, unbiased=bn == TBR)
    normalised = (h - mean) / torch.sqrt(var + teacher[1].eps) * teacher[1].weight.view(1, -1, 1, 1)
    expected = teacher[4](teacher[3](teacher[2](normalised + teacher[1].bias.view(1, -1, 1, 1))))
    torch.testing.assert_close(step.teacher_logits, expected.detach(), atol=1e-5, rtol=1e-5)
    assert (step.teacher_logits - source_view).abs().max() > 1e-2


def test_batch_mode_leaves_running_statistics_untouched():
    student, teacher = _tiny_net(0), _tiny_net(1)
    _source_statistics(student)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    distill(student, teacher, _images(32, 3), bn_sgd(student, lr=2.5e-3), default_e_max0(4), BATCH)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(student.state_dict()[key], state[key]), key
    assert not torch.equal(student[1].weight, state["1.weight"])


def test_distill_trains_only_student_bn_and_is_deterministic():
    runs = []
    for _ in range(2):
        student, teacher = _tiny_net(0), _tiny_net(1)
        losses = [distill(student, teacher, _images(32, 6 + i), bn_sgd(student, lr=2.5e-3), 0.5).loss for i in range(2)]
        runs.append((losses, [p.detach().clone() for p in student.parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    fresh = [p.detach() for p in _tiny_net(0).parameters()]
    assert [not torch.equal(a, b) for a, b in zip(runs[0][1], fresh)] == [False, False, True, True, False, False]


# --- one edge batch in the cloud (official CEMA.infer, cloud part) ---------------------


def _cloud(bn=TBR, history=0, seed=0):
    student, teacher = _tiny_net(0), _tiny_net(1)
    buffer = ReplayBuffer()
    if history:
        buffer.add(_images(history, 2))
    return (Teacher(teacher, bn_sgd(teacher, lr=2.5e-4)),
            Student(student, bn_sgd(student, lr=2.5e-3), buffer, np.random.default_rng([seed, 1])),
            CloudSettings(e0=default_e_max0(4), bn=bn))


def _batch_sizes(model):
    sizes = []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    return sizes


@pytest.mark.parametrize(
    ("history", "uploads", "teacher_sizes", "student_sizes", "steps", "pending"),
    [
        (0, 70, [32, 32, 32, 32], [32, 32], (2, 0), 6),  # no replay below 256 held
        (186, 70, [32, 128, 32, 128], [128, 128], (2, 0), 6),  # 186 + 70 = 256 held before the steps: replay
        (224, 20, [], [], (0, 0), 20),  # 244 held: no cloud batch, not > 256: nothing
        (236, 20, [], [], (0, 0), 20),  # 256 held: not MORE than 256: nothing
        (240, 20, [128], [128], (0, 1), 20),  # 260 held: the replay-only step on 4 x 32 replayed samples
        (300, 0, [128], [128], (0, 1), None),  # an edge batch that uploaded nothing still replays
    ],
)
def test_edge_batch_steps_follow_the_official_rules(history, uploads, teacher_sizes, student_sizes, steps, pending):
    teacher, student, settings = _cloud(history=history)
    seen_teacher, seen_student = _batch_sizes(teacher.model), _batch_sizes(student.model)
    done = process_edge_batch(teacher, student, _images(uploads, 9), settings)
    assert seen_teacher == teacher_sizes and seen_student == student_sizes
    assert (done.cloud_steps, done.replay_steps) == steps
    assert len(student.buffer) == history + uploads  # the whole edge batch entered the history first
    assert (None if student.pending is None else len(student.pending)) == pending
    assert len(done.teacher_predictions) == done.cloud_steps and len(done.losses) == len(student_sizes)


def test_pending_uploads_join_the_next_edge_batch_in_order():
    teacher, student, settings = _cloud()
    first, second = _images(20, 4), _images(20, 5)
    assert process_edge_batch(teacher, student, first, settings).cloud_steps == 0
    seen = []
    teacher.model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    assert process_edge_batch(teacher, student, second, settings).cloud_steps == 1
    assert torch.equal(seen[0], torch.cat([first, second[:12]])) and torch.equal(student.pending, second[12:])


def test_replay_draws_come_from_the_students_generator():
    results = []
    for seed in (0, 0, 1):
        teacher, student, settings = _cloud(history=REPLAY_MIN_SIZE, seed=seed)
        results.append(process_edge_batch(teacher, student, _images(32, 9), settings).losses)
    assert results[0] == results[1] and results[0] != results[2]


def test_cloud_settings_reject_draws_larger_than_the_history_threshold():
    with pytest.raises(ValueError, match="replays up to"):
        CloudSettings(e0=1.0, batch_size=80)
    with pytest.raises(ValueError, match="bn='none'"):
        CloudSettings(e0=1.0, bn="none")
