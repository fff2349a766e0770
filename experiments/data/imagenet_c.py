"""ImageNet-C read lazily from its folder tree: per-device online streams of real corrupted images.

Layout, as the release's tar files unpack (Hendrycks & Dietterich 2019,
https://github.com/hendrycks/robustness)::

    <root>/<corruption>/<severity>/<wnid>/<file>.JPEG

15 corruptions, severities 1-5, 1000 wnid folders per (corruption, severity), each holding
that class's 50 validation images (50,000 files). A file's label is the index of its wnid
among the 1000 wnids in sorted order: torchvision ``ImageFolder``'s rule, and torchvision's
ImageNet class index, so torchvision checkpoints predict in the same index space.

Streams. Device k's batch i is in domain ``sequence_k[(i // batches_per_domain) % L]``
(``experiments/data/online.py``, as on the digits). Within one (corruption, severity) folder
the files are shuffled by ``np.random.default_rng([seed, 51, crc32(corruption)])`` and dealt
round-robin: device k's share is ``perm[k::D]`` with D = fleet.devices, so devices never
share a file of a corruption while D <= files per folder (with more devices than files,
devices k and k + files share one). The j-th batch of that corruption in device k's stream
(j counts its batches of that corruption over all cycles) holds share positions
``(j * stream_batch + 0..stream_batch-1) mod len(share)``: a device walks through its share
and starts over once it is used up. Everything is a pure function of (seed, device, index).

Reading. A folder is listed (names only, ``os.scandir``) the first time one of its batches
is asked for; a batch opens only its own files and applies the standard ImageNet test
transform (resize the shorter side to 256, center crop 224) into uint8 NHWC, so
``StreamBatch`` and ``to_tensor`` work unchanged. ``to_tensor`` maps pixels to [-1, 1], not
ImageNet's mean/std normalisation: the torchvision networks (``models/tv_resnet.py``) convert
that input themselves, see there.

There is no proxy part (the networks come from user checkpoints, ``model.checkpoint`` and
``algorithm.cema.foundation_checkpoint``) and no held-out split: ``global_test`` (the cloud's
monitoring set, not a paper metric; CEMA reports online accuracy) draws from the same files.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np

from experiments.data import online
from experiments.data.arrays import StreamBatch
from experiments.data.checks import check_device, check_index, check_slot
from experiments.data.rendering import slot_domain
from experiments.data.stream import DevicePlan
from experiments.schema import ConfigError, DatasetConfig, ScenarioConfig

LAYOUT = "<root>/<corruption>/<severity>/<wnid>/<file>.JPEG"
NUM_CLASSES = 1000  # ILSVRC-2012 classes (Russakovsky et al. 2015), one wnid folder each
# Standard ImageNet test transform: Resize(256) then CenterCrop(224) (torchvision's
# references/classification ClassificationPresetEval; CEMA's official code,
# codebase/data/imagenet get_tta_transforms and its DALI loader).
RESIZE = 256
CROP = 224
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # ImageNet-C ships .JPEG; matched case-insensitively
ONLINE_SCENARIO = "online"  # conf/scenario/online.yaml: the only scenario ImageNet-C serves
_TAG_SHARES, _TAG_GLOBAL_TEST = 51, 52  # seed tags (online.py uses 41-42, federated.py 31-36)


@dataclass(frozen=True)
class FolderIndex:
    """The image files of one ``<root>/<corruption>/<severity>`` folder, in ImageFolder order.

    Attributes
    ----------
    folder : str
        The folder's path.
    wnids : tuple of str
        Its wnid folders, sorted; a label is an index into it.
    files : tuple of str
        Every image as ``<wnid>/<file>``, sorted by wnid then file name.
    labels : np.ndarray
        int64 label of every file.
    """

    folder: str
    wnids: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray


def check_scenario(scenario: ScenarioConfig) -> None:
    """Reject scenarios ImageNet-C cannot serve: anything but ``online``, or no corruption."""
    if scenario.name != ONLINE_SCENARIO:
        raise ConfigError(
            f"dataset.name=imagenet_c serves online test-time streams only, got "
            f"scenario.name={scenario.name!r}; run with scenario=online"
        )
    if not scenario.corruptions:
        raise ConfigError(
            "scenario.corruptions is empty, but ImageNet-C has no clean folder; list corruption "
            f"folders of dataset.root ({LAYOUT}), e.g. [gaussian_noise, fog]"
        )


def check_layout(root: str | None, corruptions: tuple[str, ...], severity: int) -> str:
    """Check that ``<root>/<corruption>/<severity>`` exists for every corruption; return the root.

    Cheap (no listing of wnid folders): it runs in config validation. The wnid folders are
    checked when a folder is first indexed (:func:`index_folder`).
    """
    if root is None:
        raise ConfigError(f"dataset.name=imagenet_c needs dataset.root: the folder laid out as {LAYOUT}")
    path = os.path.expanduser(root)
    if not os.path.isdir(path):
        raise ConfigError(f"dataset.root={root!r} is not a folder; point it at ImageNet-C laid out as {LAYOUT}")
    for corruption in corruptions:
        folder = os.path.join(path, corruption, str(severity))
        if not os.path.isdir(folder):
            found = sorted(os.listdir(path))[:20]
            raise ConfigError(
                f"ImageNet-C folder {folder} is missing (corruption {corruption!r}, scenario.severity="
                f"{severity}); dataset.root must be laid out as {LAYOUT}; {root} holds {found}"
            )
    return path


def index_folder(folder: str, num_classes: int = NUM_CLASSES) -> FolderIndex:
    """List one (corruption, severity) folder: names only, no image is opened.

    Raises
    ------
    ValueError
        ``ConfigError`` if the folder does not hold exactly ``num_classes`` wnid folders
        (a partial tree would shift every label) or holds no image file at all.
    """
    wnids = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if len(wnids) != num_classes:
        raise ConfigError(
            f"{folder} holds {len(wnids)} wnid folders, ImageNet-C has {num_classes}: a label is the "
            f"wnid's index among all {num_classes} sorted wnids, so a partial tree would mislabel; "
            f"expected layout {LAYOUT}"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        names = sorted(
            entry.name for entry in os.scandir(os.path.join(folder, wnid))
            if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES)
        )
        files += [f"{wnid}/{name}" for name in names]
        labels += [label] * len(names)
    if not files:
        raise ConfigError(f"no image file ({', '.join(IMAGE_SUFFIXES)}) under {folder}/<wnid>/; expected {LAYOUT}")
    return FolderIndex(folder, tuple(wnids), tuple(files), np.asarray(labels, dtype=np.int64))


def load_images(paths: list[str], resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """Decode ``paths`` with the standard test transform.

    Each image is converted to RGB, its shorter side resized to ``resize`` (bilinear with
    antialiasing, torchvision's ``Resize``) and center-cropped to ``crop`` (``CenterCrop``).

    Returns
    -------
    np.ndarray
        uint8, shape (len(paths), crop, crop, 3).
    """
    from PIL import Image
    from torchvision.transforms import functional as tvf  # lazy: only runs that read images pay the import

    out = np.empty((len(paths), crop, crop, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        out[i] = np.asarray(tvf.center_crop(tvf.resize(rgb, resize), [crop, crop]))
    return out


def device_share(num_files: int, num_devices: int, device: int, seed: int, corruption: str) -> np.ndarray:
    """Positions (into a folder's files) device ``device`` streams, in its order.

    ``perm[device % G :: G]`` with ``perm`` drawn by ``np.random.default_rng([seed, 51,
    crc32(corruption)])`` and ``G = min(num_devices, num_files)``: shares are disjoint and
    differ in size by at most one when ``num_devices <= num_files``.
    """
    perm = np.random.default_rng([seed, _TAG_SHARES, _name_key(corruption)]).permutation(num_files)
    groups = min(num_devices, num_files)
    return perm[device % groups :: groups]


def domain_batch(index: int, batches_per_domain: int, num_domains: int) -> int:
    """How many batches of the same domain precede batch ``index`` in a device's stream.

    E.g. with 10 batches per domain and 3 domains, batch 35 is the 5th batch of the second
    cycle in its domain: ``35 // 30 * 10 + 35 % 10 = 15``.
    """
    return index // (batches_per_domain * num_domains) * batches_per_domain + index % batches_per_domain


def batch_positions(share: np.ndarray, batch: int, j: int) -> np.ndarray:
    """The ``j``-th batch of ``batch`` positions walking through ``share`` cyclically."""
    return share[(j * batch + np.arange(batch)) % len(share)]


def _name_key(name: str) -> int:
    """A process-independent integer of a corruption name (``hash`` is salted per process)."""
    return zlib.crc32(name.encode())


class ImageNetCData:
    """ImageNet-C as the federated data of an online run: per-device streams, no proxy part.

    The same surface as :class:`experiments.data.federated.FederatedData` where it makes
    sense (``stream_batch``, ``device_domains``, ``proxy``, ``global_test``, ``sizes``,
    ``num_classes``, ``image_shape``); per-device training sets (``device``) do not exist.

    Parameters
    ----------
    dataset : DatasetConfig
        ``root`` is the ImageNet-C folder; ``global_test_samples`` sizes the cloud's set.
    scenario : ScenarioConfig
        Must be ``online``; its corruptions, severity, stream batch and batches per domain.
    num_devices : int
    seed : int
    resize, crop : int
        The test transform (defaults: the standard 256 / 224); tests may shrink them.

    Raises
    ------
    ValueError
        ``ConfigError`` naming the bad key, or the missing folder and the expected layout.
    """

    num_classes = NUM_CLASSES

    def __init__(
        self, dataset: DatasetConfig, scenario: ScenarioConfig, num_devices: int, seed: int,
        *, resize: int = RESIZE, crop: int = CROP,
    ):
        check_scenario(scenario)
        self.root = check_layout(dataset.root, scenario.corruptions, scenario.severity)
        if num_devices < 1 or seed < 0:
            raise ConfigError(f"fleet.devices={num_devices} must be >= 1 and seed={seed} >= 0")
        if not 1 <= crop <= resize:
            raise ConfigError(f"the test transform needs 1 <= crop <= resize, got crop={crop}, resize={resize}")
        self.dataset, self.scenario = dataset, scenario
        self.num_devices, self.seed = num_devices, seed
        self.resize, self.crop = resize, crop
        self.image_shape = (3, crop, crop)
        self._folders: dict[str, FolderIndex] = {}

    def folder(self, corruption: str) -> FolderIndex:
        """The index of ``<root>/<corruption>/<severity>``, listed on first use."""
        if corruption not in self._folders:
            index = index_folder(os.path.join(self.root, corruption, str(self.scenario.severity)))
            for other in self._folders.values():
                if other.wnids != index.wnids:
                    raise ConfigError(
                        f"{index.folder} and {other.folder} hold different wnid folders, so their labels "
                        "would disagree; every corruption folder needs the same 1000 wnids"
                    )
            self._folders[corruption] = index
        return self._folders[corruption]

    def preflight(self) -> None:
        """Read device 0's first batch (the run's door calls this before Ray starts): its
        folder holds the 1000 wnids and its images decode, or an error says why not."""
        self.stream_batch(0, 0)

    def device_domains(self, partition_id: int) -> tuple[str, ...]:
        """The cycle of corruptions device ``partition_id`` streams through (``online.device_domains``)."""
        k, _ = check_device(partition_id, 0, self.num_devices)
        return online.device_domains(self.scenario, self.seed, k)

    def stream_files(self, partition_id: int, index: int) -> tuple[list[str], np.ndarray, str]:
        """Which files batch ``index`` of device ``partition_id`` holds (paths, labels, domain); nothing read."""
        k, _ = check_device(partition_id, 0, self.num_devices)
        i = check_index(index)
        sequence = self.device_domains(k)
        batches = self.scenario.batches_per_domain
        domain = online.batch_domain(sequence, i, batches)
        folder = self.folder(domain)
        share = device_share(len(folder.files), self.num_devices, k, self.seed, domain)
        positions = batch_positions(share, self.scenario.stream_batch, domain_batch(i, batches, len(sequence)))
        paths = [os.path.join(folder.folder, folder.files[p]) for p in positions]
        return paths, folder.labels[positions], domain

    def stream_batch(self, partition_id: int, index: int) -> StreamBatch:
        """Batch ``index`` of device ``partition_id``'s stream: ``scenario.stream_batch`` images, read now.

        Raises
        ------
        ValueError
            A partition id outside [0, num_devices) or an index that is not an int >= 0.
        """
        paths, labels, domain = self.stream_files(partition_id, index)
        x = load_images(paths, self.resize, self.crop)
        return StreamBatch(x=x, y=labels, domain=domain, index=check_index(index))

    def device_plan(self, partition_id: int, slot: int = 0) -> tuple[DevicePlan, np.ndarray]:
        """A device's share of its first domain as a plan (``rows`` = file positions), no local test set.

        Device discovery reports ``len(plan.rows)`` as the device's number of examples.
        """
        k, _ = check_device(partition_id, slot, self.num_devices)
        domain = self.device_domains(k)[0]
        rows = device_share(len(self.folder(domain).files), self.num_devices, k, self.seed, domain)
        zeros = np.zeros(len(rows), dtype=np.int64)
        return DevicePlan(rows=rows.astype(np.int64), draws=np.arange(len(rows)), slots=zeros), zeros[:0]

    def device(self, partition_id: int, slot: int = 0):
        """Not available: ImageNet-C devices hold streams, not training sets."""
        raise ConfigError(
            "dataset.name=imagenet_c serves online streams only; algorithms that train on per-device "
            "datasets cannot run on it: use algorithm=cema or an on-device TTA baseline (conf/algorithm/)"
        )

    def device_train(self, partition_id: int, slot: int = 0):
        """Not available, as :meth:`device`."""
        return self.device(partition_id, slot)

    def device_test(self, partition_id: int, slot: int = 0):
        """Not available, as :meth:`device`."""
        return self.device(partition_id, slot)

    def proxy(self) -> tuple[np.ndarray, np.ndarray]:
        """No proxy part: empty (0, crop, crop, 3) uint8 images and (0,) int64 labels."""
        return np.zeros((0, self.crop, self.crop, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64)

    def global_test(self, slot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The cloud's monitoring set: ``dataset.global_test_samples`` images, read now.

        Shared evenly over ``scenario.corruptions`` (earlier ones get the remainder), or all
        from slot ``slot``'s corruption; corruption c's files are taken in the order of
        ``np.random.default_rng([seed, 52, crc32(c)]).permutation``.
        """
        domains = self.scenario.corruptions if slot is None else (slot_domain(self.scenario, check_slot(slot)),)
        count = self.dataset.global_test_samples
        paths: list[str] = []
        labels: list[np.ndarray] = []
        for d, domain in enumerate(domains):
            take = count // len(domains) + (d < count % len(domains))
            folder = self.folder(domain)
            rng = np.random.default_rng([self.seed, _TAG_GLOBAL_TEST, _name_key(domain)])
            perm = rng.permutation(len(folder.files))
            positions = perm[np.arange(take) % len(perm)]
            paths += [os.path.join(folder.folder, folder.files[p]) for p in positions]
            labels.append(folder.labels[positions])
        return load_images(paths, self.resize, self.crop), np.concatenate(labels)

    def sizes(self) -> dict:
        """A summary: root, classes, image shape, corruptions and files per indexed folder."""
        return {
            "dataset": self.dataset.name,
            "root": self.root,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "devices": self.num_devices,
            "severity": self.scenario.severity,
            "domains": list(self.scenario.corruptions),
            "files_per_folder": {name: len(index.files) for name, index in self._folders.items()},
        }
