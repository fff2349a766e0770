"""Write the CEMA golden fixtures by running the official code (chenyaofo/CEMA) on fixed tensors.

``python -m tests.golden.make_cema --reference <checkout of chenyaofo/CEMA> --commit <40-hex>``

Fixtures (inputs, and what the official code computed on them):

``cema_filter`` / ``cema_filter_dynamic``
    ``EntropyCriterion`` + ``SimilarityCriterion`` as ``CEMA.infer`` chains them, over a few
    batches of logits: upload masks, ``cnt_ent_high_margin`` and the softmax history after each
    batch. ``cema_filter``: the official conf (no ``E_min``, no warm-up); ``_dynamic``: the
    poster's variant (``E_min``, warm-up, lambda).
``cema_loss``
    ``TTADistillationLoss`` (temperature 1 and 2): loss and its gradient on the student logits.
``cema_tbr_layer``
    ``tbr_bn_forward_impl`` on one BatchNorm2d: eval forward (sets the statistics), train
    forward (moves them; gradients of input, weight, bias), eval forward.
``cema_step_tbr`` / ``cema_step_batch``
    One ``CEMA.infer`` on a batch of 32 with the edge filter opened (every sample uploaded):
    the edge prediction, the foundation step, the distillation step (teacher and student
    logits, loss), both models' gradients and state after it; ``is_tbr`` true / false.
``cema_replay_tbr`` / ``cema_replay_batch``
    Nine edge batches with the filter closed, then uploads of 288 (nine cloud steps, each with
    96 replayed samples), 16 (no cloud batch: the replay-only step on 128) and 24 samples (one
    step): steps, losses and states after each edge batch.
``cema_stream_tbr`` / ``cema_stream_batch``
    A stream of edge batches through ``CEMA.infer`` with the official conf's filter
    (``d_margin`` 0.4 for 5 classes): edge logits, upload masks, steps, losses, final states.

The harness around the reference, recorded in every fixture's ``notes``: the package
``__init__`` of ``codebase.core.tta`` (which imports modules the repository lacks) is skipped,
``.cotta`` (missing) is a stub whose ``get_tta_transforms`` returns None (``infer`` never uses
it), ``codebase.models.MODEL.build_from`` returns the harness's foundation network instead of
downloading one, ``.cuda()`` is the identity on CPU, and ``random.sample`` draws with
``numpy.random.Generator.choice(len, k, replace=False)`` from a generator seeded like the
project's replay draws (the project's ``ReplayBuffer.sample``), so both sides replay the same
samples. Outputs are observed with forward hooks and by wrapping the criteria's
``filter_out``; nothing of the reference's computation is changed.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.golden.fixture import save
from tests.golden.nets import seeded_net, shifted_images, state_arrays

REPOSITORY = "chenyaofo/CEMA"
CEMA_FILE = "codebase/core/tta/cema.py"
TBR_FILE = "codebase/core/tta/tbr.py"
LOSS_FILE = "codebase/criterion/distillation.py"
# float32 on CPU on both sides; the project sums and reorders in its own way.
TOLERANCE = 1e-6
# Many steps in a row compound float32 differences.
STREAM_TOLERANCE = 1e-5
# Losses are about 10, where float32 values are 9.5e-7 apart: a few units in the last place.
LOSS_TOLERANCE = 4e-6

# Official conf/cema.conf.
ALPHA, BETA, GAMMA, TEMPERATURE = 3.0, 3.0, 1.0, 1.0
S_TTA_LR, T_TTA_LR = 0.0025, 0.00025
ENT_HIGH_MARGIN, ENT_HIGH_MARGIN_COEFF = 0.4, 0.6
BATCH_SIZE, REPLAY_BUFFER_SIZE, K = 32, 10000, 1
# The tiny networks: 5 classes, a 4-channel edge model and an 8-channel foundation model.
CLASSES, STUDENT_CHANNELS, TEACHER_CHANNELS = 5, 4, 8
STUDENT_SEED, TEACHER_SEED = 7, 2
# Spreads the edge model's entropies over (0, ln C) so the filter keeps and drops samples.
STUDENT_LOGIT_SCALE = 12.0
IMAGE_SIZE = 4
# Per-sample channel offsets of the stream's images (varied predictions, so uploads keep coming).
STREAM_SPREAD = 4.0
# The replay draws' generator (both sides seed numpy's default_rng with it).
REPLAY_SEED = 7
# Redundancy margin for 5 classes (EATA's CIFAR-10-C value).
D_MARGIN = 0.4
# The poster's filter variant for cema_filter_dynamic (tools/results.txt: E_min 0.02, lambda 1.0).
DYNAMIC_ENT_LOW, DYNAMIC_WARM_UP, DYNAMIC_COEFF = 0.02, 40, 1.0
# Filter fixture: batches of logits, each row scaled by a factor drawn from FILTER_SCALES.
FILTER_BATCHES, FILTER_BATCH, FILTER_SEED, FILTER_SCALES = 6, 16, 5, (0.5, 8.0)
# Loss fixture: logits of both models.
LOSS_SAMPLES, LOSS_SEED, LOSS_SCALE, LOSS_TEMPERATURES = 8, 9, 2.0, (1.0, 2.0)
# TBR layer fixture: 3 channels, its affine parameters, three batches (seed, shift per step).
TBR_WEIGHT, TBR_BIAS = (0.8, 1.2, 1.0), (0.1, -0.2, 0.05)
TBR_SAMPLES, TBR_IMAGE_SEED, TBR_SHIFT_STEP, TBR_PROJECTION_SEED = 6, 50, 0.3, 12
# Step fixture: one cloud batch of images.
STEP_IMAGE_SEED = 20
# Replay fixture: closed edge batches, then the uploads of each opened one.
REPLAY_CLOSED, REPLAY_CLOSED_SIZE, REPLAY_UPLOADS, REPLAY_IMAGE_SEED = 9, 8, (288, 16, 24), 30
# Stream fixture: edge batches of 64, and a redundancy margin that keeps part of each batch.
STREAM_BATCHES, STREAM_BATCH, STREAM_IMAGE_SEED, STREAM_D_MARGIN = 24, 64, 40, 0.9

NOTES = (
    "CPU harness: codebase.core.tta's package __init__ (imports modules the repository lacks) is skipped; "
    ".cotta (missing) is a stub whose get_tta_transforms returns None; codebase.models.MODEL.build_from "
    "returns the harness's foundation network; .cuda() is the identity; random.sample draws with "
    "numpy Generator.choice(len, k, replace=False) seeded like the project's ReplayBuffer.sample. "
    "Outputs observed with forward hooks and by wrapping the criteria's filter_out."
)


def import_reference(root: Path) -> types.ModuleType:
    """``codebase.core.tta.cema`` of the checkout at ``root``, with the harness's stubs (module docstring)."""
    sys.path.insert(0, str(root))
    package = types.ModuleType("codebase.core.tta")
    package.__path__ = [str(root / "codebase" / "core" / "tta")]
    sys.modules["codebase.core.tta"] = package
    cotta = types.ModuleType("codebase.core.tta.cotta")
    cotta.get_tta_transforms = lambda *args, **kwargs: None
    sys.modules["codebase.core.tta.cotta"] = cotta
    models = types.ModuleType("codebase.models")
    models.MODEL = types.SimpleNamespace(build_from=lambda spec: _FOUNDATION.pop())
    sys.modules["codebase.models"] = models
    import codebase.core.tta.cema as cema  # noqa: PLC0415 (the checkout is on sys.path only now)

    return cema


#: The foundation network the next ``MODEL.build_from`` returns.
_FOUNDATION: list[nn.Module] = []
#: The generator the patched ``random.sample`` draws with.
_DRAWS: list[np.random.Generator] = []


@contextmanager
def cpu_harness():
    """``.cuda()`` is the identity; ``random.sample`` draws with :data:`_DRAWS` (module docstring)."""
    cuda, sample = torch.Tensor.cuda, random.sample

    def numpy_sample(population, k):
        picks = _DRAWS[0].choice(len(population), size=k, replace=False)
        return [population[int(i)] for i in picks]

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    random.sample = numpy_sample
    try:
        yield
    finally:
        torch.Tensor.cuda, random.sample = cuda, sample


def student_net() -> nn.Module:
    """The edge model: a seeded tiny BN net, no classifier bias, weights scaled by :data:`STUDENT_LOGIT_SCALE`."""
    net = seeded_net(STUDENT_SEED, STUDENT_CHANNELS, CLASSES)
    with torch.no_grad():
        net.classifier.weight.mul_(STUDENT_LOGIT_SCALE)
        net.classifier.bias.zero_()
    return net


def stream_images(seed: int, n: int) -> torch.Tensor:
    """``n`` images of the stream: noise plus a per-sample offset per channel (:data:`STREAM_SPREAD`)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, (n, 3, IMAGE_SIZE, IMAGE_SIZE)) + rng.normal(0.0, STREAM_SPREAD, (n, 3, 1, 1))
    return torch.from_numpy(x).float()


def teacher_net() -> nn.Module:
    """The foundation model: a seeded tiny BN net with more channels."""
    return seeded_net(TEACHER_SEED, TEACHER_CHANNELS, CLASSES)


def build_cema(cema, student: nn.Module, teacher: nn.Module, *, is_tbr: bool, ent_low=None, warm_up=None,
               coeff=ENT_HIGH_MARGIN_COEFF, d_margin=D_MARGIN):
    """The official ``CEMA`` with the official conf's settings and the given filter settings."""
    _FOUNDATION.append(teacher)
    return cema.CEMA(
        student, ent_low_margin=ent_low, ent_high_margin=ENT_HIGH_MARGIN, d_margin=d_margin, warm_up_batch_size=warm_up,
        ent_high_margin_coeff=coeff, teacher_model_name="harness", batch_size=BATCH_SIZE, alpha=ALPHA, beta=BETA,
        gamma=GAMMA, temperature=TEMPERATURE, replay_buffer_size=REPLAY_BUFFER_SIZE, s_tta_lr=S_TTA_LR,
        t_tta_lr=T_TTA_LR, n_class=CLASSES, is_tbr=is_tbr, K=K,
    )


class Recorder:
    """Outputs of the student, the teacher and the distillation loss, in call order, with the BN mode."""

    def __init__(self, method) -> None:
        self.calls: list[tuple[str, bool, torch.Tensor]] = []
        self.masks: list[torch.Tensor] = []
        self._handles = []
        for name, module in (("student", method.edge_model), ("teacher", method.foundation_model)):
            self._handles.append(module.register_forward_hook(self._hook(name, module)))
        self._handles.append(method.distill_loss.register_forward_hook(
            lambda m, args, out: self.calls.append(("loss", True, out.detach().clone()))))

    def _hook(self, name, module):
        def hook(_module, _args, out):
            train = any(m.training for m in module.modules() if isinstance(m, nn.BatchNorm2d))
            self.calls.append((name, train, out.detach().clone()))
        return hook

    def take(self) -> list[tuple[str, bool, torch.Tensor]]:
        calls, self.calls = self.calls, []
        return calls


def record_masks(method) -> list[np.ndarray]:
    """Wrap the instance's criteria so each edge batch's upload mask is kept (returned list grows)."""
    masks: list[np.ndarray] = []
    entropy_filter, similarity_filter = method.entropy_criterion.filter_out, method.similarity_criterion.filter_out
    state = {}

    def entropy_out(logits):
        state["ids"] = entropy_filter(logits)
        state["size"] = len(logits)
        return state["ids"]

    def similarity_out(logits):
        ids = similarity_filter(logits)
        mask = np.zeros(state["size"], dtype=bool)
        mask[state["ids"][ids].numpy()] = True
        masks.append(mask)
        return ids

    method.entropy_criterion.filter_out = entropy_out
    method.similarity_criterion.filter_out = similarity_out
    return masks


def bn_state(net: nn.Module, prefix: str, with_statistics: bool) -> dict[str, np.ndarray]:
    """BN affine parameters (and TBR statistics, flattened to (C,)) of ``net`` as fixture arrays."""
    out = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            out[f"{prefix}/{name}.weight"] = module.weight.detach().numpy().copy()
            out[f"{prefix}/{name}.bias"] = module.bias.detach().numpy().copy()
            if with_statistics:
                out[f"{prefix}/{name}.running_mean"] = module.running_mean.detach().reshape(-1).numpy().copy()
                out[f"{prefix}/{name}.running_var"] = module.running_var.detach().reshape(-1).numpy().copy()
    return out


def bn_grads(net: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """Gradients the last backward left on ``net``'s BN affine parameters."""
    return {f"{prefix}/{name}.{p}": getattr(module, p).grad.numpy().copy()
            for name, module in net.named_modules() if isinstance(module, nn.BatchNorm2d) for p in ("weight", "bias")}


def image_checksum(x: torch.Tensor) -> np.ndarray:
    """Sum and sum of squares: the test checks it regenerated the same images."""
    return np.array([float(x.double().sum()), float((x.double() ** 2).sum())])


# --------------------------------------------------------------------------- fixtures
def filter_logits() -> list[torch.Tensor]:
    """Batches of float32 logits whose entropies spread over (0, ln C)."""
    rng = np.random.default_rng(FILTER_SEED)
    batches = []
    for _ in range(FILTER_BATCHES):
        scale = rng.uniform(*FILTER_SCALES, size=(FILTER_BATCH, 1))
        batches.append(torch.from_numpy(rng.normal(size=(FILTER_BATCH, CLASSES)) * scale).float())
    return batches


def write_filter(cema, source: dict, name: str, ent_low, warm_up, coeff) -> None:
    """``EntropyCriterion`` then ``SimilarityCriterion`` on each batch, as ``CEMA.infer`` chains them."""
    ln_c = math.log(CLASSES)
    entropy_criterion = cema.EntropyCriterion(
        ent_high_margin=ENT_HIGH_MARGIN * ln_c, ent_low_margin=None if ent_low is None else ent_low * ln_c,
        warm_up_batch_size=warm_up, ent_high_margin_coeff=coeff)
    similarity_criterion = cema.SimilarityCriterion(d_margin=D_MARGIN)
    batches = filter_logits()
    masks, thresholds, histories = [], [], []
    for logits in batches:
        ids = entropy_criterion.filter_out(logits)
        kept = similarity_criterion.filter_out(logits[ids])
        mask = np.zeros(len(logits), dtype=bool)
        mask[ids[kept].numpy()] = True
        masks.append(mask)
        thresholds.append(entropy_criterion.cnt_ent_high_margin)
        history = similarity_criterion.history_model_probs
        histories.append(np.full(CLASSES, np.nan) if history is None else history.numpy())
    unset = -1  # what the fixture stores for a setting left at null
    settings = [ENT_HIGH_MARGIN, unset if ent_low is None else ent_low, unset if warm_up is None else warm_up, coeff,
                D_MARGIN]
    arrays = {"logits": torch.stack(batches).numpy(), "masks": np.stack(masks), "thresholds": np.array(thresholds),
              "histories": np.stack(histories), "settings": np.array(settings)}
    function = "EntropyCriterion.filter_out, SimilarityCriterion.filter_out"
    save(name, arrays, {**source, "file": CEMA_FILE, "function": function, "tolerance": TOLERANCE})


def write_loss(cema, source: dict) -> None:
    """``TTADistillationLoss`` at temperature 1 and 2: loss and gradient on the student logits."""
    rng = np.random.default_rng(LOSS_SEED)
    student = torch.from_numpy(rng.normal(size=(LOSS_SAMPLES, CLASSES)) * LOSS_SCALE).float()
    teacher = torch.from_numpy(rng.normal(size=(LOSS_SAMPLES, CLASSES)) * LOSS_SCALE).float()
    e_max = ENT_HIGH_MARGIN * math.log(CLASSES)
    arrays = {"student_logits": student.numpy(), "teacher_logits": teacher.numpy(), "e_max": np.array(e_max)}
    loss_module = sys.modules["codebase.criterion.distillation"]
    for temperature in LOSS_TEMPERATURES:
        # is_reciprocal_temperature and mse_balanced are False in CEMA.__init__
        loss_fn = loss_module.TTADistillationLoss(ALPHA, BETA, GAMMA, temperature, False, False, e_max)
        logits = student.clone().requires_grad_(True)
        loss = loss_fn(logits, teacher)
        loss.backward()
        arrays[f"loss_t{temperature:g}"] = np.array(loss.item())
        arrays[f"grad_t{temperature:g}"] = logits.grad.numpy()
    save("cema_loss", arrays, {**source, "file": LOSS_FILE, "function": "TTADistillationLoss.forward",
                               "tolerance": TOLERANCE})


def write_tbr_layer(cema, source: dict) -> None:
    """``tbr_bn_forward_impl``: eval (sets statistics), train (moves them, gradients), eval."""
    layer = nn.BatchNorm2d(len(TBR_WEIGHT))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(TBR_WEIGHT))
        layer.bias.copy_(torch.tensor(TBR_BIAS))
    layer.forward = types.MethodType(cema.tbr_bn_forward_impl, layer)
    layer.running_mean, layer.running_var = None, None  # prepare_model_for_tent_tta
    modes = (False, True, False)
    xs = [shifted_images(TBR_IMAGE_SEED + i, TBR_SAMPLES, IMAGE_SIZE, shift=TBR_SHIFT_STEP * i)
          for i in range(len(modes))]
    weights = torch.from_numpy(np.random.default_rng(TBR_PROJECTION_SEED).normal(size=xs[0].shape)).float()
    arrays = {"x": torch.stack(xs).numpy(), "projection": weights.numpy(),
              "weight": layer.weight.detach().numpy().copy(), "bias": layer.bias.detach().numpy().copy()}
    for step, train in enumerate(modes):
        layer.train(train)
        x = xs[step].clone().requires_grad_(train)
        out = layer(x)
        if train:
            (out * weights).sum().backward()
            arrays["grad_x"], arrays["grad_weight"], arrays["grad_bias"] = (
                x.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy())
        arrays[f"out{step}"] = out.detach().numpy()
        arrays[f"running_mean{step}"] = layer.running_mean.detach().reshape(-1).numpy().copy()
        arrays[f"running_var{step}"] = layer.running_var.detach().reshape(-1).numpy().copy()
    save("cema_tbr_layer", arrays, {**source, "file": TBR_FILE, "function": "tbr_bn_forward_impl",
                                    "tolerance": TOLERANCE})


def open_filter(method) -> None:
    """Every sample of the next edge batches is uploaded (no entropy bound, no redundancy test)."""
    method.entropy_criterion.ent_high_margin = math.inf
    method.similarity_criterion.d_margin = None


def close_filter(method) -> None:
    """No sample of the next edge batches is uploaded."""
    method.entropy_criterion.ent_high_margin = -math.inf


def initial_nets() -> tuple[nn.Module, nn.Module, dict]:
    """Fresh student and teacher, and their initial states as fixture arrays."""
    student, teacher = student_net(), teacher_net()
    arrays = {**state_arrays(student, "student0"), **state_arrays(teacher, "teacher0")}
    # state_arrays' arrays share the tensors' memory: copy them before any step changes the tensors
    return student, teacher, {key: value.copy() for key, value in arrays.items()}


def write_step(cema, source: dict, is_tbr: bool) -> None:
    """One ``CEMA.infer`` on 32 opened samples: edge prediction, foundation step, distillation step."""
    student, teacher, arrays = initial_nets()
    method = build_cema(cema, student, teacher, is_tbr=is_tbr)
    open_filter(method)
    recorder = Recorder(method)
    x = shifted_images(STEP_IMAGE_SEED, BATCH_SIZE, IMAGE_SIZE)
    method.infer(x)
    calls = recorder.take()
    names = [(name, train) for name, train, _ in calls]
    expected = [("student", False), ("teacher", True), ("teacher", False), ("student", True), ("loss", True)]
    assert names == expected, names
    arrays.update({"x": x.numpy(), "edge_logits": calls[0][2].numpy(), "teacher_adapt_logits": calls[1][2].numpy(),
                   "teacher_logits": calls[2][2].numpy(), "student_logits": calls[3][2].numpy(),
                   "loss": calls[4][2].numpy()})
    arrays.update(bn_state(student, "student1", is_tbr) | bn_state(teacher, "teacher1", is_tbr))
    arrays.update(bn_grads(student, "student_grad") | bn_grads(teacher, "teacher_grad"))
    mode = "tbr" if is_tbr else "batch"
    save(f"cema_step_{mode}", arrays, {**source, "file": CEMA_FILE, "function": f"CEMA.infer (is_tbr={is_tbr})",
                                      "tolerance": TOLERANCE})


def step_summary(calls) -> tuple[int, int, list[float]]:
    """Foundation steps, distillation steps and their losses among one edge batch's recorded calls."""
    foundation = sum(1 for name, train, _ in calls if name == "teacher" and train)
    losses = [float(out) for name, _, out in calls if name == "loss"]
    return foundation, len(losses), losses


def write_replay(cema, source: dict, is_tbr: bool) -> None:
    """Closed edge batches, then 288, 16 and 24 uploads: replayed steps and the replay-only step."""
    student, teacher, arrays = initial_nets()
    method = build_cema(cema, student, teacher, is_tbr=is_tbr)
    recorder = Recorder(method)
    _DRAWS[:] = [np.random.default_rng(REPLAY_SEED)]
    close_filter(method)
    closed = shifted_images(REPLAY_IMAGE_SEED, REPLAY_CLOSED * REPLAY_CLOSED_SIZE, IMAGE_SIZE)
    for batch in closed.split(REPLAY_CLOSED_SIZE):
        method.infer(batch)
    recorder.take()
    open_filter(method)
    opened = shifted_images(REPLAY_IMAGE_SEED + 1, sum(REPLAY_UPLOADS), IMAGE_SIZE)
    counts, losses = [], []
    for index, batch in enumerate(opened.split(list(REPLAY_UPLOADS))):
        method.infer(batch)
        foundation, distills, step_losses = step_summary(recorder.take())
        counts.append([foundation, distills])
        losses += step_losses
        arrays.update(bn_state(student, f"student_after{index}", is_tbr))
        arrays.update(bn_state(teacher, f"teacher_after{index}", is_tbr))
    arrays.update({"counts": np.array(counts), "losses": np.array(losses),
                   "history": np.array(len(method.history_buffer)),
                   "closed_checksum": image_checksum(closed), "opened_checksum": image_checksum(opened)})
    mode = "tbr" if is_tbr else "batch"
    save(f"cema_replay_{mode}", arrays, {**source, "file": CEMA_FILE, "function": f"CEMA.infer (is_tbr={is_tbr})",
                                        "tolerance": TOLERANCE})


def write_stream(cema, source: dict, is_tbr: bool) -> None:
    """A stream of edge batches through ``CEMA.infer`` with the official conf's filter."""
    student, teacher, arrays = initial_nets()
    method = build_cema(cema, student, teacher, is_tbr=is_tbr, d_margin=STREAM_D_MARGIN)
    recorder = Recorder(method)
    masks = record_masks(method)
    _DRAWS[:] = [np.random.default_rng(REPLAY_SEED)]
    images = stream_images(STREAM_IMAGE_SEED, STREAM_BATCHES * STREAM_BATCH)
    edge_logits, counts, losses = [], [], []
    for batch in images.split(STREAM_BATCH):
        edge_logits.append(method.infer(batch).numpy())
        foundation, distills, step_losses = step_summary(recorder.take())
        counts.append([foundation, distills])
        losses += step_losses
    arrays.update({"edge_logits": np.stack(edge_logits), "masks": np.stack(masks), "counts": np.array(counts),
                   "losses": np.array(losses), "checksum": image_checksum(images)})
    arrays.update(bn_state(student, "student_end", is_tbr) | bn_state(teacher, "teacher_end", is_tbr))
    mode = "tbr" if is_tbr else "batch"
    save(f"cema_stream_{mode}", arrays, {**source, "file": CEMA_FILE, "function": f"CEMA.infer (is_tbr={is_tbr})",
                                        "tolerance": STREAM_TOLERANCE})


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, import the reference, write every fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a checkout of chenyaofo/CEMA")
    parser.add_argument("--commit", required=True, help="the checkout's 40-hex commit")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        raise SystemExit(f"--commit must be the 40-hex commit of the checkout, got {args.commit!r}")
    torch.set_num_threads(1)
    cema = import_reference(Path(args.reference))
    command = " ".join(["python -m tests.golden.make_cema", *(argv if argv is not None else sys.argv[1:])])
    source = {"repository": REPOSITORY, "commit": args.commit, "produced_by": command, "notes": NOTES}
    with cpu_harness():
        write_filter(cema, source, "cema_filter", None, None, ENT_HIGH_MARGIN_COEFF)
        write_filter(cema, source, "cema_filter_dynamic", DYNAMIC_ENT_LOW, DYNAMIC_WARM_UP, DYNAMIC_COEFF)
        write_loss(cema, source)
        write_tbr_layer(cema, source)
        for is_tbr in (True, False):
            write_step(cema, source, is_tbr)
            write_replay(cema, source, is_tbr)
            write_stream(cema, source, is_tbr)


if __name__ == "__main__":
    main()
