"""What the TTA fixture writers (``make_tta_*.py``) share: loading reference files, the CPU harness, inputs.

The reference code is imported from a checkout given on the command line, never copied. Its
modules are loaded by file path under their own names; a module whose package ``__init__`` or
sibling imports need what the checkout lacks gets minimal stand-in modules in ``sys.modules``,
and every fixture says so in its ``notes``.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import tarfile
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.golden.nets import seeded_net, shifted_images

# The tiny shared network of the TTA fixtures: 5 classes, 4 channels, 4 x 4 images.
CLASSES, CHANNELS, IMAGE = 5, 4, 4
# float32 on CPU on both sides, one or two steps; the project sums in its own order.
TOLERANCE = 1e-6
# Several steps in a row compound float32 differences.
MULTI_STEP_TOLERANCE = 1e-5
NOTE_CUDA = ".cuda() is the identity on CPU."


def load_module(name: str, path: Path, stubs: dict[str, types.ModuleType] | None = None) -> types.ModuleType:
    """Import the file ``path`` as module ``name`` (after putting ``stubs`` into ``sys.modules``)."""
    for stub_name, stub in (stubs or {}).items():
        sys.modules[stub_name] = stub
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def package(name: str, path: Path) -> types.ModuleType:
    """An empty package ``name`` over directory ``path`` (its own ``__init__`` is not run)."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module
    return module


def extract_commit(git_dir: Path, commit: str, paths: list[str]) -> Path:
    """``git archive`` of ``paths`` at ``commit`` of the repository ``git_dir``, unpacked in a temporary directory."""
    archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", commit, *paths],
                             check=True, capture_output=True).stdout
    root = Path(tempfile.mkdtemp(prefix="golden_tta_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root


@contextmanager
def cuda_is_identity():
    """``Tensor.cuda()`` and ``Module.cuda()`` return their object unchanged inside the block."""
    saved = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved


class RecordingTorch(types.ModuleType):
    """Stands for ``torch`` inside one reference module: every attribute is torch's, except those
    given as overrides (e.g. a ``where`` that records its result, a ``rand`` drawing fixed masks)."""

    def __init__(self, **overrides):
        super().__init__("torch")
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(torch, name)


def net(seed: int, logit_scale: float = 1.0) -> nn.Module:
    """The seeded tiny BN network, its classifier scaled by ``logit_scale`` (confidence knob)."""
    model = seeded_net(seed, CHANNELS, CLASSES)
    with torch.no_grad():
        model.classifier.weight.mul_(logit_scale)
        model.classifier.bias.mul_(logit_scale)
    return model


def centred_net(seed: int, logit_scale: float, x: torch.Tensor) -> nn.Module:
    """The seeded tiny network, its classifier scaled by ``logit_scale`` and its bias set to centre the
    logits on ``x`` (batches, as :func:`batches`): predictions spread over the classes."""
    model = net(seed, logit_scale)
    with torch.no_grad():
        features = model.train().features(x.reshape(-1, *x.shape[2:]))
        model.classifier.bias.copy_(-(model.classifier.weight @ features.mean(0)))
    return model.eval()


def batches(seed: int, count: int, n: int, size: int = IMAGE) -> torch.Tensor:
    """``count`` batches of ``n`` shifted images, shape (count, n, 3, size, size)."""
    return shifted_images(seed, count * n, size).reshape(count, n, 3, size, size)


def parameters(model: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """``model``'s parameters as fixture arrays ``prefix/name``."""
    return {f"{prefix}/{name}": p.detach().cpu().numpy().copy() for name, p in model.named_parameters()}


def running_statistics(model: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """Every BN layer's running mean and variance as fixture arrays ``prefix/name``."""
    return {f"{prefix}/{name}": b.detach().cpu().numpy().copy() for name, b in model.named_buffers()
            if name.endswith(("running_mean", "running_var"))}


def source(repository: str, commit: str, produced_by: str, file: str, function: str, tolerance: float,
           notes: str) -> dict:
    """A fixture's source entry (``tests.golden.fixture.SOURCE_KEYS``)."""
    return {"repository": repository, "commit": commit, "produced_by": produced_by, "file": file,
            "function": function, "tolerance": tolerance, "notes": notes}
