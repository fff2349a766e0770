"""CoTTA fixtures from the official code (qinenergy/cotta ``cifar/cotta.py``, ``imagenet/cotta.py``).

``cotta_augment``
    ``cifar/cotta.py get_tta_transforms()`` on two 32 x 32 images, each after
    ``torch.manual_seed(seed)``: the augmented images.
``cotta_cifar_augment``
    ``CoTTA.forward`` (CIFAR-10 setting: Adam lr 1e-3, EMA 0.999, restore 0.01, anchor 0.92,
    cross-entropy) on two batches of 32 x 32 images with an unconfident network, so the teacher's
    prediction is the mean over 32 augmentations; ``torch.manual_seed(seed)`` before each batch
    seeds the augmentations and then the restore masks.
``cotta_cifar_confident``
    The same code and setting with a confident network (anchor confidence >= 0.92: the teacher
    predicts the batch as it is) and restore probability 0.2, so the stochastic restore resets many
    weights. The CIFAR code computes (and discards) the 32 augmentations even then; the restore
    masks are drawn from a separate generator seeded per batch, through a stand-in for the
    module's ``torch`` whose ``rand`` draws from it.
``cotta_imagenet_confident``
    ``imagenet/cotta.py CoTTA.forward`` (SGD lr 0.01 momentum 0.9 Nesterov as ``imagenetc.py
    setup_optimizer``; EMA 0.999, restore 0.001, anchor 0.1, symmetric cross-entropy): the anchor
    is confident, ``torch.manual_seed(seed)`` before each batch seeds the restore masks.

Each CoTTA fixture holds per batch the returned (teacher) logits and every student and teacher
parameter after the last batch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import types
from pathlib import Path

import numpy as np
import torch

from tests.golden.fixture import save
from tests.golden.nets import shifted_images, state_arrays
from tests.golden.tta_harness import (
    MULTI_STEP_TOLERANCE,
    NOTE_CUDA,
    TOLERANCE,
    RecordingTorch,
    batches,
    cuda_is_identity,
    load_module,
    net,
    parameters,
)

REPOSITORY = "qinenergy/cotta"
# cifar/cotta.py hard-codes 32 x 32 images (its crop size); augmentation inputs are that size.
CIFAR_SIZE = 32
AUGMENT_IMAGE_SEEDS, AUGMENT_SEEDS = (41, 42), (51, 52)
# cfgs/cifar10/cotta.yaml: OPTIM.LR 1e-3 (Adam, BETA 0.9, WD 0), MT 0.999, RST 0.01, AP 0.92.
CIFAR_LR, CIFAR_EMA, CIFAR_RESTORE, CIFAR_ANCHOR = 1e-3, 0.999, 0.01, 0.92
# The confident fixture restores with this probability so the fixed masks reset many weights.
RAISED_RESTORE = 0.2
# imagenet/cfgs/10orders/cotta/*.yaml: OPTIM.LR 0.01, METHOD SGD.
IMAGENET_LR = 0.01
NET_SEED, CONFIDENT_SCALE, BATCHES = 13, 30.0, 2
CONFIDENT_IMAGES, CONFIDENT_BATCH = 23, 16
AUGMENT_IMAGES, AUGMENT_BATCH = 24, 4
BATCH_SEEDS = (61, 62)
NOTES = (NOTE_CUDA + " torchvision's RandomAffine no longer takes resample/fillcolor: the module's "
         "transforms is torchvision.transforms with a RandomAffine that maps resample=PIL.Image.BILINEAR "
         "to interpolation=BILINEAR and fillcolor=None to fill=0. collect_params' prints are silenced.")


def write(root: Path, commit: str, produced_by: str) -> list[Path]:
    """Run the checkout's CIFAR and ImageNet CoTTA; write the four fixtures."""
    cifar = _load(root / "cifar", "golden_ref_cotta_cifar")
    imagenet = _load(root / "imagenet", "golden_ref_cotta_imagenet")
    info = {"repository": REPOSITORY, "commit": commit, "produced_by": produced_by}
    with cuda_is_identity():
        return [_augment(cifar, info), _cifar_augment(cifar, info), _cifar_confident(cifar, info),
                _imagenet_confident(imagenet, info)]


def _load(directory: Path, name: str) -> types.ModuleType:
    """``cotta.py`` of ``directory`` with its own ``my_transforms`` and the RandomAffine adapter."""
    load_module("my_transforms", directory / "my_transforms.py")
    module = load_module(name, directory / "cotta.py")
    module.transforms = _transforms_with_old_affine()
    return module


def _transforms_with_old_affine() -> types.ModuleType:
    import PIL.Image
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    class RandomAffine(transforms.RandomAffine):
        def __init__(self, degrees, translate=None, scale=None, shear=None, resample=None, fillcolor=None):
            mode = InterpolationMode.BILINEAR if resample == PIL.Image.BILINEAR else InterpolationMode.NEAREST
            super().__init__(degrees, translate, scale, shear, interpolation=mode,
                             fill=0 if fillcolor is None else fillcolor)

    shim = types.ModuleType("transforms")
    shim.__dict__.update(vars(transforms))
    shim.RandomAffine = RandomAffine
    return shim


def _augment(cifar, info: dict) -> Path:
    transform = cifar.get_tta_transforms()
    images = []
    for image_seed, seed in zip(AUGMENT_IMAGE_SEEDS, AUGMENT_SEEDS):
        torch.manual_seed(seed)
        images.append(transform(shifted_images(image_seed, 1, CIFAR_SIZE)))
    arrays = {"image_seeds": np.array(AUGMENT_IMAGE_SEEDS), "seeds": np.array(AUGMENT_SEEDS),
              "augmented": torch.stack(images).numpy()}
    return save("cotta_augment", arrays, {**info, "file": "cifar/cotta.py", "function": "get_tta_transforms()",
                                          "tolerance": TOLERANCE, "notes": NOTES})


def _cotta(module, model, optimizer, **settings):
    model = module.configure_model(model)
    with contextlib.redirect_stdout(io.StringIO()):
        params, _ = module.collect_params(model)
    return module.CoTTA(model, optimizer(params), steps=1, episodic=False, **settings)


def _adam(params):
    return torch.optim.Adam(params, lr=CIFAR_LR, betas=(0.9, 0.999), weight_decay=0.0)


def _nesterov(params):
    return torch.optim.SGD(params, lr=IMAGENET_LR, momentum=0.9, dampening=0, weight_decay=0.0, nesterov=True)


def _run(cotta, x: torch.Tensor, before_batch) -> dict:
    logits = []
    for seed, batch in zip(BATCH_SEEDS, x):
        before_batch(seed)
        logits.append(cotta(batch).detach())
    return {"logits": torch.stack(logits).numpy(), "batch_seeds": np.array(BATCH_SEEDS),
            **parameters(cotta.model, "student"), **parameters(cotta.model_ema, "teacher")}


def _cifar_augment(cifar, info: dict) -> Path:
    x = shifted_images(AUGMENT_IMAGES, BATCHES * AUGMENT_BATCH, CIFAR_SIZE).reshape(BATCHES, AUGMENT_BATCH, 3,
                                                                                  CIFAR_SIZE, CIFAR_SIZE)
    initial = net(NET_SEED)
    cotta = _cotta(cifar, copy.deepcopy(initial), _adam, mt_alpha=CIFAR_EMA, rst_m=CIFAR_RESTORE, ap=CIFAR_ANCHOR)
    arrays = {"image_seed": np.int64(AUGMENT_IMAGES), "checksum": np.float64(x.double().sum()),
              **state_arrays(initial, "init"), **_run(cotta, x, torch.manual_seed)}
    function = "CoTTA.forward (cfgs/cifar10/cotta.yaml; augmentation-averaged teacher)"
    return save("cotta_cifar_augment", arrays, {**info, "file": "cifar/cotta.py", "function": function,
                                                "tolerance": MULTI_STEP_TOLERANCE, "notes": NOTES})


def _cifar_confident(cifar, info: dict) -> Path:
    x = batches(CONFIDENT_IMAGES, BATCHES, CONFIDENT_BATCH)
    initial = net(NET_SEED, CONFIDENT_SCALE)
    cotta = _cotta(cifar, copy.deepcopy(initial), _adam, mt_alpha=CIFAR_EMA, rst_m=RAISED_RESTORE, ap=CIFAR_ANCHOR)
    masks = [torch.Generator()]
    cifar.torch = RecordingTorch(rand=lambda *args: torch.rand(*args, generator=masks[0]))
    arrays = {"x": x.numpy(), **state_arrays(initial, "init"), "restore_prob": np.float64(RAISED_RESTORE),
              **_run(cotta, x, lambda seed: masks[0].manual_seed(seed))}
    function = "CoTTA.forward (cfgs/cifar10/cotta.yaml, RST 0.2; confident anchor)"
    notes = NOTES + (" The module's torch is a stand-in whose rand (the restore masks) draws from a generator "
                     "seeded with batch_seeds[k] before batch k; the discarded augmentations use the global one.")
    return save("cotta_cifar_confident", arrays, {**info, "file": "cifar/cotta.py", "function": function,
                                                  "tolerance": MULTI_STEP_TOLERANCE, "notes": notes})


def _imagenet_confident(imagenet, info: dict) -> Path:
    x = batches(CONFIDENT_IMAGES, BATCHES, CONFIDENT_BATCH)
    initial = net(NET_SEED)
    cotta = _cotta(imagenet, copy.deepcopy(initial), _nesterov)
    arrays = {"x": x.numpy(), **state_arrays(initial, "init"), **_run(cotta, x, torch.manual_seed)}
    function = "CoTTA.forward (SGD lr 0.01 Nesterov as imagenetc.py setup_optimizer; confident anchor)"
    return save("cotta_imagenet_confident", arrays, {**info, "file": "imagenet/cotta.py", "function": function,
                                                     "tolerance": MULTI_STEP_TOLERANCE, "notes": NOTES})
