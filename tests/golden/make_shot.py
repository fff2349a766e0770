"""Write the SHOT golden fixtures by running the official code (tim-learn/SHOT) on fixed tensors.

``python -m tests.golden.make_shot --reference <checkout of tim-learn/SHOT> --commit <40-hex>``

Fixtures (inputs, and what the official code computed on them):

``shot_im``, ``shot_im_sharp``
    ``digit/uda_digit.py`` ``train_target`` with ``cls_par = 0`` (information maximisation only),
    one SGD step of a :class:`~tests.golden.nets.TinyBNNet` on shifted images: the logits of the
    training forward, the loss, its gradient with respect to the logits, the state after the step
    (every state-dict entry, flattened). ``_sharp``: the head's weights scaled up (confident
    predictions).
``shot_loss``
    The same with ``cls_par = 0.3`` (SHOT's objective): also the pseudo-labels ``obtain_label``
    returned inside ``train_target`` (network in eval mode, running BN statistics) and, for
    contrast, what ``obtain_label`` returns on the same network left in train mode (batch
    statistics), which the fixture must differ from.
``shot_obtain_label_digit`` / ``shot_obtain_label_object``
    ``obtain_label`` of ``digit/uda_digit.py`` and of ``object/image_target.py`` on fixed features
    with a fixed linear head (identity feature extractor and bottleneck).

The harness around the reference, recorded in every fixture's ``notes``: ``.cuda()`` is the
identity on CPU; ``train_target`` gets its data loaders, networks and source weights from the
harness (``digit_load``, ``network.*`` and ``torch.load`` are replaced while it runs); a loader's
iterator offers SHOT's Python 2 style ``.next()``; the loss value is read when SHOT calls
``backward`` on it and the logits' gradient with a tensor hook; ``cv2`` (imported by
``object/data_list.py`` for image files, never called here) is an empty stub module.
"""

from __future__ import annotations

import argparse
import copy
import io
import re
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.golden.fixture import save
from tests.golden.nets import TinyBNNet, seeded_net, shifted_images, state_arrays

REPOSITORY = "tim-learn/SHOT"
DIGIT_FILE = "digit/uda_digit.py"
OBJECT_FILE = "object/image_target.py"
# Both sides are float32 on CPU; the project reorders sums (e.g. a permuted mini-batch).
TOLERANCE = 1e-5
# Pseudo-labels are indices: compared exactly.
LABEL_TOLERANCE = 0.0

# The tiny network and its target batch: 16 shifted 6 x 6 images, each with its own per-channel
# offset (drawn from OFFSET_SEED, spread OFFSET_SPREAD) so pooled features differ between samples;
# the head's bias is zeroed so the features decide the class. These seeds give eval-mode labels
# over all 3 classes that differ from the batch-statistics ones (checked when writing).
NET_SEED = 11
IMAGE_SEED = 5
OFFSET_SEED = 105
OFFSET_SPREAD = 1.0
IMAGES = 16
IMAGE_SIZE = 6
CHANNELS = 4
CLASSES = 3
# The settings train_target reads: uda_digit.py's argparse defaults, except the lr (SHOT: 0.01),
# raised so that one step moves the weights by ~1e-3, far above float32 noise.
SHOT_LR = 1.0
SHOT_CLS_PAR = 0.3
SHOT_ENT_PAR = 1.0
SHOT_BATCH_SIZE = 64
# One epoch of one batch = one SGD step; the lr of that step is lr * (1 + 10 * 1/1) ** -0.75.
SHOT_MAX_EPOCH = 1
# image_target.py argparse defaults read by its obtain_label.
OBJECT_EPSILON = 1e-5
OBJECT_THRESHOLD = 0
OBJECT_DISTANCE = "cosine"
# One train_target step each: name -> (cls_par, head scale). cls_par 0 is information
# maximisation alone; the sharp head (weights x 30) makes predictions confident, where SHOT's
# log(p + 1e-5) and the exact entropy differ most.
STEP_FIXTURES = {"shot_im": (0.0, 1.0), "shot_im_sharp": (0.0, 30.0),
                 "shot_loss": (SHOT_CLS_PAR, 1.0)}
# Fixed features for obtain_label alone: (samples, feature dim, classes, head scale, seed).
# digit: every class is some sample's argmax and keeps a sample after the soft round (where both
# scripts agree). object adds a class that no sample's argmax picks (excluded from the soft round
# by ``labelset``) and a class that loses every sample in the soft round (excluded from the
# refinement).
LABEL_CASES = {
    "digit": [(24, 6, 4, 2.0, 0)],
    "object": [(24, 6, 4, 2.0, 0), (24, 6, 4, 2.0, 36), (12, 6, 4, 1.0, 28)],
}

NOTES = {
    "train_target": (
        "CPU harness: .cuda() is the identity; train_target's digit_load, network.LeNetBase / "
        "feat_bottleneck / feat_classifier and torch.load are replaced by the harness (a "
        "TinyBNNet's features as netF, nn.Identity as netB, its linear head as netC, its initial "
        "weights as the 'source' model), and its loaders are one fixed batch whose iterator has "
        ".next(); lr 1.0 instead of 0.01 (a visible step); the loss is read at its backward() "
        "and the logits' gradient by a tensor hook."),
    "obtain_label": (
        "CPU harness: .cuda() is the identity; the loader is one fixed batch whose iterator has "
        ".next(); netF and netB are nn.Identity, netC a seeded nn.Linear; cv2 is an empty stub "
        "module (object/data_list.py imports it for image files, unused here)."),
}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, import the reference, write every fixture."""
    args = _parser().parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        raise SystemExit(f"--commit must be the 40-hex commit of the checkout, got {args.commit!r}")
    digit, image = import_reference(Path(args.reference))
    command = " ".join(["python -m tests.golden.make_shot", *(argv or sys.argv[1:])])
    source = {"repository": REPOSITORY, "commit": args.commit, "produced_by": command}
    with cpu_harness():
        write_train_target_fixtures(digit, image, source)
        write_obtain_label_fixtures(digit, image, source)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a checkout of tim-learn/SHOT")
    parser.add_argument("--commit", required=True, help="the checkout's 40-hex commit")
    return parser


def import_reference(checkout: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Import ``digit/uda_digit.py`` and ``object/image_target.py`` from a SHOT checkout.

    Both folders hold modules named ``network`` and ``loss``; each script keeps the ones it
    imported, and the shared names are dropped from ``sys.modules`` in between.
    """
    for sub in ("digit", "object"):
        if not (checkout / sub).is_dir():
            raise SystemExit(f"{checkout} is not a tim-learn/SHOT checkout (no {sub}/ folder)")
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    modules = []
    for sub, name in (("digit", "uda_digit"), ("object", "image_target")):
        sys.path.insert(0, str(checkout / sub))
        try:
            modules.append(__import__(name))
        finally:
            sys.path.pop(0)
            for shared in ("network", "loss", "data_load", "data_list"):
                sys.modules.pop(shared, None)
    return modules[0], modules[1]


@contextmanager
def cpu_harness() -> Iterator[None]:
    """``Tensor.cuda`` and ``Module.cuda`` return their object unchanged inside the block."""
    saved = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved


class Loader:
    """A fixed list of batches with ``len`` and an iterator that also answers ``.next()``."""

    def __init__(self, batches: list[tuple]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple]:
        return _Iterator(iter(self.batches))


class _Iterator:
    def __init__(self, inner: Iterator[tuple]) -> None:
        self.inner = inner

    def __next__(self) -> tuple:
        return next(self.inner)

    next = __next__


def target_inputs(head_scale: float = 1.0) -> tuple[TinyBNNet, torch.Tensor]:
    """The tiny network (head weights times ``head_scale``, bias 0) and the target batch."""
    net = seeded_net(NET_SEED, CHANNELS, CLASSES)
    with torch.no_grad():
        net.classifier.weight.mul_(head_scale)
        net.classifier.bias.zero_()
    offsets = np.random.default_rng(OFFSET_SEED).normal(0, OFFSET_SPREAD, (IMAGES, 3, 1, 1))
    x = shifted_images(IMAGE_SEED, IMAGES, size=IMAGE_SIZE) + torch.from_numpy(offsets).float()
    return net, x


def write_train_target_fixtures(digit: types.ModuleType, image: types.ModuleType,
                                source: dict) -> None:
    """One official ``train_target`` step on the tiny network per entry of :data:`STEP_FIXTURES`."""
    for name, (cls_par, head_scale) in STEP_FIXTURES.items():
        net, x = target_inputs(head_scale)
        arrays = {"x": x.numpy(), **_copied(state_arrays(net, "initial"))}
        contrast = labels_of(digit, net, x, train=True) if cls_par > 0 else None
        object_labels = labels_of(image, net, x, train=False) if cls_par > 0 else None
        record = run_train_target(digit, net, x, cls_par)
        arrays.update(record)
        arrays["after"] = flat_state(net)
        arrays["lr"] = np.float64(step_lr())
        if cls_par > 0:
            _require_discriminative(record, contrast, object_labels)
            arrays["labels_batch_statistics"] = contrast
        save(name, arrays, {**source, "file": DIGIT_FILE, "function": "train_target",
                            "tolerance": TOLERANCE, "notes": NOTES["train_target"]})


def flat_state(net: nn.Module) -> np.ndarray:
    """Every state-dict entry of ``net``, flattened in state-dict order, as one float64 vector."""
    return torch.cat([value.detach().double().flatten()
                      for value in net.state_dict().values()]).numpy()


def _copied(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of ``state_arrays``'s arrays, which share memory with the (trained) parameters."""
    return {key: value.copy() for key, value in arrays.items()}


def step_lr() -> float:
    """The lr of train_target's only step: ``lr_scheduler`` with iter_num = max_iter = 1.

    uda_digit.py ``lr_scheduler``: ``lr0 * (1 + gamma * iter_num / max_iter) ** -power`` with
    gamma 10, power 0.75.
    """
    return SHOT_LR * (1 + 10 * 1 / 1) ** -0.75


def run_train_target(digit: types.ModuleType, net: TinyBNNet, x: torch.Tensor,
                     cls_par: float) -> dict[str, np.ndarray]:
    """Run the official ``train_target`` for one step on ``net`` (changed in place); its records."""
    record: dict[str, np.ndarray] = {}
    batch = (x, torch.zeros(len(x)), torch.arange(len(x)))
    loaders = {"target": Loader([batch]), "target_te": Loader([batch[:2]]),
               "test": Loader([batch[:2]])}
    net.features.in_features = CHANNELS
    networks = {"LeNetBase": lambda: net.features, "feat_bottleneck": lambda **_: nn.Identity(),
                "feat_classifier": lambda **_: net.classifier}
    weights = {"source_F.pt": net.features.state_dict(), "source_B.pt": {},
               "source_C.pt": net.classifier.state_dict()}
    hook = net.classifier.register_forward_hook(lambda _m, _i, out: _record_logits(out, record))
    with _replaced(digit, "digit_load", lambda _args: loaders), \
            _replaced_all(digit.network, networks), \
            _replaced(torch, "load", lambda path: copy.deepcopy(weights[Path(path).name])), \
            _replaced(digit, "obtain_label", _recording_obtain_label(digit.obtain_label, record)), \
            _recorded_backward(record):
        digit.train_target(_train_args(cls_par))
    hook.remove()
    return record


def _train_args(cls_par: float) -> argparse.Namespace:
    return argparse.Namespace(
        dset="u2m", classifier="bn", bottleneck=CHANNELS, layer="linear", class_num=CLASSES,
        output_dir="source", lr=SHOT_LR, max_epoch=SHOT_MAX_EPOCH, batch_size=SHOT_BATCH_SIZE,
        cls_par=cls_par, ent_par=SHOT_ENT_PAR, ent=True, gent=True, issave=False,
        out_file=io.StringIO())


def _record_logits(logits: torch.Tensor, record: dict[str, np.ndarray]) -> None:
    """Keep the training forward's logits (the one with a graph) and their gradient."""
    if not logits.requires_grad:
        return
    record["logits"] = logits.detach().numpy().copy()
    logits.register_hook(lambda grad: record.__setitem__("grad_logits", grad.numpy().copy()))


def _recording_obtain_label(original, record: dict[str, np.ndarray]):
    def obtain_label(loader, netF, netB, netC, args, *rest):
        record["label_bn_training"] = np.array(
            [m.training for m in netF.modules() if isinstance(m, nn.BatchNorm2d)])
        labels = original(loader, netF, netB, netC, args, *rest)
        record["labels"] = np.asarray(labels, dtype=np.int64)
        return labels
    return obtain_label


@contextmanager
def _recorded_backward(record: dict[str, np.ndarray]) -> Iterator[None]:
    """Record the scalar SHOT calls ``backward`` on (its loss), then run the real backward."""
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        record["loss"] = np.float64(self.detach().item())
        return original(self, *args, **kwargs)

    with _replaced(torch.Tensor, "backward", backward):
        yield


@contextmanager
def _replaced(owner, name: str, value) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@contextmanager
def _replaced_all(owner, values: dict) -> Iterator[None]:
    saved = {name: getattr(owner, name) for name in values}
    for name, value in values.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def labels_of(module: types.ModuleType, net: TinyBNNet, x: torch.Tensor, *,
              train: bool) -> np.ndarray:
    """``module.obtain_label`` on a copy of ``net`` in train (BN batch statistics) or eval mode."""
    twin = copy.deepcopy(net).train(train)
    loader = Loader([(x, torch.zeros(len(x)))])
    args = _label_args(CLASSES)
    return np.asarray(module.obtain_label(loader, twin.features, nn.Identity(), twin.classifier,
                                          args), dtype=np.int64)


def _label_args(classes: int) -> argparse.Namespace:
    return argparse.Namespace(out_file=io.StringIO(), class_num=classes, epsilon=OBJECT_EPSILON,
                              threshold=OBJECT_THRESHOLD, distance=OBJECT_DISTANCE)


def _require_discriminative(record: dict, contrast: np.ndarray, object_labels: np.ndarray) -> None:
    """Eval-mode labels must differ from batch-statistics ones and not depend on SHOT's version."""
    if not record["label_bn_training"].size or record["label_bn_training"].any():
        raise SystemExit("train_target did not label in eval mode; the harness is out of date")
    if np.array_equal(record["labels"], contrast):
        raise SystemExit("eval-mode and batch-statistics labels agree on this batch; pick other "
                         "NET_SEED / IMAGE_SEED so the fixture can tell them apart")
    if not np.array_equal(record["labels"], object_labels):
        raise SystemExit("uda_digit.py and image_target.py label this batch differently; pick "
                         "other NET_SEED / IMAGE_SEED so the pipeline fixture fits both")


def write_obtain_label_fixtures(digit: types.ModuleType, image: types.ModuleType,
                                source: dict) -> None:
    """``obtain_label`` of both SHOT scripts on fixed features and a fixed linear head."""
    for version, module, file in (("digit", digit, DIGIT_FILE), ("object", image, OBJECT_FILE)):
        arrays: dict[str, np.ndarray] = {}
        for index, case in enumerate(LABEL_CASES[version]):
            features, logits, labels = official_labels(module, *case)
            arrays.update({f"case{index}/features": features, f"case{index}/logits": logits,
                           f"case{index}/labels": labels})
        save(f"shot_obtain_label_{version}", arrays,
             {**source, "file": file, "function": "obtain_label", "tolerance": LABEL_TOLERANCE,
              "notes": NOTES["obtain_label"]})


def official_labels(module: types.ModuleType, samples: int, dim: int, classes: int, scale: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, the head's logits (as obtain_label saw them) and obtain_label's labels."""
    rng = np.random.default_rng(seed)
    features = torch.from_numpy(rng.normal(0, 1, (samples, dim))).float()
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rng.normal(0, scale, (classes, dim))).float())
        head.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, classes)).float())
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    loader = Loader([(features, torch.zeros(samples))])
    labels = module.obtain_label(loader, nn.Identity(), nn.Identity(), head, _label_args(classes))
    hook.remove()
    return features.numpy(), seen[0].numpy(), np.asarray(labels, dtype=np.int64)


if __name__ == "__main__":
    main()
