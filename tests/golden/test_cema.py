"""CEMA against the official code (chenyaofo/CEMA): fixtures written by ``tests/golden/make_cema.py``.

Each test feeds the fixture's inputs to the project's functions and compares with what the
official code computed: the edge filter, the distillation loss, one TBR layer, one full cloud
step in both BN modes, the replay and replay-only steps, and a whole stream (the project's
device prediction, filter and cloud loop against ``CEMA.infer``, edge batch by edge batch).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from clients.cema import edge_logits
from models.cema.cloud import EDGE_LR, FOUNDATION_LR, ReplayBuffer, adapt_foundation, bn_sgd, distill, distillation_loss
from models.cema.edge_batch import CloudSettings, Student, Teacher, process_edge_batch
from models.cema.filter import UploadFilter
from models.cema.tbr import BATCH, TBR, reset_statistics, tbr_batch_norm
from tests.golden.fixture import check, exact, load
from tests.golden.make_cema import (
    CLASSES,
    ENT_HIGH_MARGIN,
    LOSS_TOLERANCE,
    REPLAY_CLOSED,
    REPLAY_CLOSED_SIZE,
    REPLAY_IMAGE_SEED,
    REPLAY_SEED,
    REPLAY_UPLOADS,
    STREAM_BATCH,
    STREAM_BATCHES,
    STREAM_D_MARGIN,
    STREAM_IMAGE_SEED,
    STUDENT_CHANNELS,
    TEACHER_CHANNELS,
    image_checksum,
    stream_images,
)
from tests.golden.nets import TinyBNNet, load_state, shifted_images

torch.set_num_threads(1)
E0 = ENT_HIGH_MARGIN * math.log(CLASSES)
IMAGE_SIZE = 4
MODES = {"tbr": TBR, "batch": BATCH}


def _unset(value: float):
    """The generator writes -1 for a setting left at null (None)."""
    return None if value < 0 else value


@pytest.mark.parametrize("name", ["cema_filter", "cema_filter_dynamic"])
def test_upload_filter_matches_the_official_criteria(name):
    fx = load(name)
    e_max, e_min, warm_up, coeff, d_margin = fx["settings"]
    upload_filter = UploadFilter(CLASSES, e_max_fraction=float(e_max), e_min_fraction=_unset(float(e_min)),
                                 threshold_coeff=float(coeff), warmup_samples=_unset(int(warm_up)),
                                 cosine_margin=float(d_margin))
    masks, thresholds, histories = [], [], []
    for logits in torch.from_numpy(fx["logits"]):
        masks.append(upload_filter.select(logits).numpy())
        thresholds.append(upload_filter.threshold)
        history = upload_filter.history
        histories.append(np.full(CLASSES, np.nan) if history is None else history.numpy())
    exact(fx, np.stack(masks), "masks", "upload masks per batch")
    check(fx, thresholds, "thresholds", "E_max^t after each batch")
    check(fx, np.stack(histories), "histories", "softmax history after each batch")
    assert fx["masks"].any(axis=1).all() and not fx["masks"].all()  # the fixture keeps and drops samples


def test_distillation_loss_and_gradient_match_the_official_loss():
    fx = load("cema_loss")
    teacher = torch.from_numpy(fx["teacher_logits"])
    for temperature in (1, 2):
        student = torch.from_numpy(fx["student_logits"]).requires_grad_(True)
        loss = distillation_loss(student, teacher, float(fx["e_max"]), temperature=float(temperature))
        loss.backward()
        check(fx, loss.item(), f"loss_t{temperature}", f"distillation loss, T={temperature}", LOSS_TOLERANCE)
        check(fx, student.grad, f"grad_t{temperature}", f"loss gradient on the student logits, T={temperature}")


def test_tbr_layer_matches_the_official_forward():
    fx = load("cema_tbr_layer")
    layer = nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(fx["weight"]))
        layer.bias.copy_(torch.from_numpy(fx["bias"]))
    layer.num_batches_tracked.zero_()
    for step, train in enumerate((False, True, False)):
        layer.train(train)
        x = torch.from_numpy(fx["x"][step]).requires_grad_(train)
        out = tbr_batch_norm(layer, x)
        if train:
            (out * torch.from_numpy(fx["projection"])).sum().backward()
            check(fx, x.grad, "grad_x", "TBR input gradient (through the batch statistics)")
            check(fx, layer.weight.grad, "grad_weight", "TBR weight gradient")
            check(fx, layer.bias.grad, "grad_bias", "TBR bias gradient")
        mode = "train" if train else "eval"
        check(fx, out.detach(), f"out{step}", f"TBR output, {mode} forward {step}")
        check(fx, layer.running_mean, f"running_mean{step}", f"TBR running mean after forward {step}")
        check(fx, layer.running_var, f"running_var{step}", f"TBR running var after forward {step}")


def _nets(fx, bn: str) -> tuple[nn.Module, nn.Module]:
    student = load_state(TinyBNNet(STUDENT_CHANNELS, CLASSES), fx.arrays, "student0")
    teacher = load_state(TinyBNNet(TEACHER_CHANNELS, CLASSES), fx.arrays, "teacher0")
    if bn == TBR:  # official prepare_model_for_tent_tta: no statistics until the first batch
        reset_statistics(student)
        reset_statistics(teacher)
    return student, teacher


def _check_bn(fx, net: nn.Module, prefix: str, with_statistics: bool, what: str) -> None:
    keys = ("weight", "bias", "running_mean", "running_var") if with_statistics else ("weight", "bias")
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            for key in keys:
                check(fx, getattr(module, key).detach(), f"{prefix}/{name}.{key}", f"{what} {name}.{key}")


@pytest.mark.parametrize("mode", ["tbr", "batch"])
def test_one_cloud_step_matches_the_official_infer(mode):
    fx, bn = load(f"cema_step_{mode}"), MODES[mode]
    student, teacher = _nets(fx, bn)
    x = torch.from_numpy(fx["x"])
    check(fx, edge_logits(student, x, tbr=bn == TBR, edge_bn=None), "edge_logits", f"{mode}: edge prediction")
    adapt_outputs = []
    hook = teacher.register_forward_hook(lambda m, args, out: adapt_outputs.append(out.detach()))
    adapt_foundation(teacher, x, E0, bn_sgd(teacher, FOUNDATION_LR), bn)
    hook.remove()
    check(fx, adapt_outputs[0], "teacher_adapt_logits", f"{mode}: foundation logits in its adaptation step")
    step = distill(student, teacher, x, bn_sgd(student, EDGE_LR), E0, bn)
    check(fx, step.teacher_logits, "teacher_logits", f"{mode}: teacher logits in the distillation step")
    check(fx, step.student_logits, "student_logits", f"{mode}: student logits in the distillation step")
    check(fx, step.loss, "loss", f"{mode}: distillation loss", LOSS_TOLERANCE)
    for net, prefix in ((student, "student"), (teacher, "teacher")):
        for name, module in net.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                for key in ("weight", "bias"):
                    grad = getattr(module, key).grad
                    check(fx, grad, f"{prefix}_grad/{name}.{key}", f"{mode}: {prefix} gradient {name}.{key}")
        _check_bn(fx, net, f"{prefix}1", bn == TBR, f"{mode}: {prefix} after the step")


def _cloud(fx, bn: str) -> tuple[Teacher, Student]:
    student, teacher = _nets(fx, bn)
    return (Teacher(teacher, bn_sgd(teacher, FOUNDATION_LR)),
            Student(student, bn_sgd(student, EDGE_LR), ReplayBuffer(), np.random.default_rng(REPLAY_SEED)))


@pytest.mark.parametrize("mode", ["tbr", "batch"])
def test_replay_and_replay_only_steps_match_the_official_infer(mode):
    fx, bn = load(f"cema_replay_{mode}"), MODES[mode]
    teacher, student = _cloud(fx, bn)
    settings = CloudSettings(e0=E0, bn=bn)
    closed = shifted_images(REPLAY_IMAGE_SEED, REPLAY_CLOSED * REPLAY_CLOSED_SIZE, IMAGE_SIZE)
    opened = shifted_images(REPLAY_IMAGE_SEED + 1, sum(REPLAY_UPLOADS), IMAGE_SIZE)
    check(fx, image_checksum(closed), "closed_checksum", "regenerated inputs", tolerance=1e-9)
    check(fx, image_checksum(opened), "opened_checksum", "regenerated inputs", tolerance=1e-9)
    for batch in closed.split(REPLAY_CLOSED_SIZE):  # the edge predicts, uploads nothing
        edge_logits(student.model, batch, tbr=bn == TBR, edge_bn=None)
        process_edge_batch(teacher, student, batch[:0], settings)
    counts, losses = [], []
    for index, batch in enumerate(opened.split(list(REPLAY_UPLOADS))):
        edge_logits(student.model, batch, tbr=bn == TBR, edge_bn=None)
        steps = process_edge_batch(teacher, student, batch, settings)
        counts.append([steps.cloud_steps, steps.cloud_steps + steps.replay_steps])
        losses += steps.losses
        _check_bn(fx, student.model, f"student_after{index}", bn == TBR, f"{mode}: student after edge batch {index}")
        _check_bn(fx, teacher.model, f"teacher_after{index}", bn == TBR, f"{mode}: teacher after edge batch {index}")
    exact(fx, counts, "counts", f"{mode}: foundation and distillation steps per edge batch (288, 16, 24 uploads)")
    check(fx, losses, "losses", f"{mode}: every distillation loss, replayed steps and the replay-only step",
          LOSS_TOLERANCE)
    exact(fx, len(student.buffer), "history", f"{mode}: history size")


@pytest.mark.parametrize("mode", ["tbr", "batch"])
def test_a_stream_matches_the_official_infer_batch_by_batch(mode):
    fx, bn = load(f"cema_stream_{mode}"), MODES[mode]
    teacher, student = _cloud(fx, bn)
    settings = CloudSettings(e0=E0, bn=bn)
    upload_filter = UploadFilter(CLASSES, e_min_fraction=None, threshold_coeff=0.6, warmup_samples=None,
                                 cosine_margin=STREAM_D_MARGIN)  # official conf/cema.conf otherwise
    images = stream_images(STREAM_IMAGE_SEED, STREAM_BATCHES * STREAM_BATCH)
    check(fx, image_checksum(images), "checksum", "regenerated inputs", tolerance=1e-9)
    logits, masks, counts, losses = [], [], [], []
    for batch in images.split(STREAM_BATCH):
        out = edge_logits(student.model, batch, tbr=bn == TBR, edge_bn=None)
        mask = upload_filter.select(out)
        steps = process_edge_batch(teacher, student, batch[mask], settings)
        logits.append(out.numpy())
        masks.append(mask.numpy())
        counts.append([steps.cloud_steps, steps.cloud_steps + steps.replay_steps])
        losses += steps.losses
    exact(fx, np.stack(masks), "masks", f"{mode}: upload masks of {STREAM_BATCHES} edge batches")
    exact(fx, counts, "counts", f"{mode}: foundation and distillation steps per edge batch")
    check(fx, np.stack(logits), "edge_logits", f"{mode}: edge predictions over the stream")
    check(fx, losses, "losses", f"{mode}: every distillation loss over the stream")
    _check_bn(fx, student.model, "student_end", bn == TBR, f"{mode}: student after the stream")
    _check_bn(fx, teacher.model, "teacher_end", bn == TBR, f"{mode}: teacher after the stream")
    replay_only = sum(1 for foundation, distills in counts if distills > foundation)
    assert replay_only >= 1 and any(c == [1, 1] for c in counts)  # the stream exercises both kinds of step
