"""CIFAR-10 and CIFAR-100 read from their python-pickle release, offline by default.

The files are the ones the CIFAR page ships (https://www.cs.toronto.edu/~kriz/cifar.html)
and torchvision unpacks: ``cifar-10-batches-py/data_batch_1..5, test_batch`` (labels key
``labels``) and ``cifar-100-python/train, test`` (labels key ``fine_labels``); each
pickle holds ``data``, a (N, 3072) uint8 array of R, G and B planes of 32x32 images.
Only ``dataset.download=true`` lets torchvision fetch them; otherwise the files are read
where ``dataset.root`` points, without checksums (so small fixtures work in tests).
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass

import numpy as np

from experiments.schema import AugmentConfig, ConfigError

IMAGE_SIZE = 32  # CIFAR images are 32x32 RGB (Krizhevsky 2009)


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR release keeps its pickles (same names as torchvision's loaders)."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    torchvision_class: str


LAYOUTS = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        torchvision_class="CIFAR10",
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        torchvision_class="CIFAR100",
    ),
}


class CifarSource:
    """A CIFAR release as an image source: train originals, then the official test set.

    Attributes
    ----------
    name : str
        ``"cifar10"`` or ``"cifar100"``.
    labels : np.ndarray
        int64 labels, train images first, then test images.
    num_classes : int
        10 or 100.
    fixed_test : np.ndarray
        Indices of the official test images: they are the test part, so the numbers stay
        comparable with published CIFAR results (``test_fraction`` does not apply).
    expands : bool
        False: images are used as they are, no augmentation.
    """

    expands = False

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, num_train: int):
        self.name = name
        self.num_classes = LAYOUTS[name].num_classes
        self.images = images
        self.labels = labels
        self.fixed_test = np.arange(num_train, len(labels))

    def render(
        self, originals: np.ndarray, seeds: np.ndarray, augment: AugmentConfig
    ) -> np.ndarray:
        """Return the originals' images as they are, uint8 (N, 32, 32, 3).

        ``seeds`` and ``augment`` are accepted for the common source interface and not
        used: CIFAR samples are not augmented.
        """
        return self.images[np.asarray(originals, dtype=np.int64)]


@functools.lru_cache(maxsize=2)
def load_cifar(name: str, root: str | None, download: bool = False) -> CifarSource:
    """Load a CIFAR release once per process.

    Parameters
    ----------
    name : str
        ``"cifar10"`` or ``"cifar100"``.
    root : str or None
        Folder holding ``cifar-10-batches-py`` or ``cifar-100-python``.
    download : bool
        Let torchvision download the release into ``root`` first (needs internet).

    Returns
    -------
    CifarSource

    Raises
    ------
    ValueError
        Unknown name, no root, or files missing while ``download`` is false.
    """
    if name not in LAYOUTS:
        raise ConfigError(
            f"dataset.name={name!r} is not a CIFAR release; use one of {sorted(LAYOUTS)}"
        )
    layout = LAYOUTS[name]
    if root is None:
        raise ConfigError(
            f"dataset.name={name} needs dataset.root: set it to the folder that holds "
            f"{layout.folder}/ (or also set dataset.download=true to fetch it there)"
        )
    root = os.path.expanduser(root)
    if download:
        _download(layout, root)
    train_x, train_y = _read_files(layout, root, layout.train_files)
    test_x, test_y = _read_files(layout, root, layout.test_files)
    images = np.concatenate([train_x, test_x])
    labels = np.concatenate([train_y, test_y])
    return CifarSource(name, images, labels, num_train=len(train_y))


def _download(layout: CifarLayout, root: str) -> None:
    """Fetch and unpack the release with torchvision (only on ``dataset.download=true``)."""
    import torchvision

    getattr(torchvision.datasets, layout.torchvision_class)(root, train=True, download=True)


def _read_files(
    layout: CifarLayout, root: str, files: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Read pickles into uint8 NHWC images and int64 labels."""
    images, labels = [], []
    for file in files:
        path = os.path.join(root, layout.folder, file)
        if not os.path.isfile(path):
            raise ConfigError(
                f"CIFAR file {path} not found: set dataset.root to the folder that holds "
                f"{layout.folder}/, or set dataset.download=true to fetch it"
            )
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = np.asarray(entry["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry[layout.label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
