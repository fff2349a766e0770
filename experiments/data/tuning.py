"""The tuning split: devices, streams and originals that no evaluated run uses.

Hyper-parameters searched on the batches a method is then scored on overstate it. A search
therefore streams its own split, made by original image as the data split is: the run's
tuning part (``FederatedData.split.tune``, the edge originals in the fixed tuning reserve of
:func:`experiments.data.partition.tuning_reserve`), which no device of any run (any fleet
size, any seed) holds. Tuning devices ``tune-0``, ``tune-1``, ... stream it in the run's
scenario layout -- ``stream_batch`` samples a batch, ``batches_per_domain`` batches a domain,
batch pairs disjoint by original (:func:`experiments.data.online.batch_originals`) -- with
domain orders, draws and renders seeded under tags of their own, so no tuning batch repeats an
evaluated device's stream either. :class:`TuningStreams` has ``FederatedData``'s stream surface
(``scenario``, ``device_domains``, ``stream_batch``), so code written for a fleet device's
sequence runs unchanged on a tuning device's.
"""

from __future__ import annotations

import numpy as np

from experiments.data import online
from experiments.data.arrays import StreamBatch
from experiments.data.checks import check_index
from experiments.data.federated import FederatedData
from experiments.data.rendering import render_in_domains, seed_rows
from experiments.schema import ConfigError

#: Tuning devices a search streams by default: one sequence of every domain, as one evaluated
#: device sees (the ElasticDNN search's cost on the 2-core machine is linear in it).
TUNE_DEVICES = 1
#: Name of tuning device t: ``tune-<t>`` (the fleet's devices are partition ids 0..N-1).
TUNE_DEVICE_PREFIX = "tune-"
#: Seed tags of the tuning devices' domain orders, batch draws and renders (the fleet's: 41, 42, 36;
#: taken elsewhere: partition.py 11-14, stream.py 21-24, federated.py 31-36, imagenet_c.py 51-52).
TAG_TUNE_ORDER, TAG_TUNE_BATCH, TAG_TUNE_STREAM = 61, 62, 63


class TuningStreams:
    """The tuning devices' online streams, on the tuning part of ``data`` only.

    Parameters
    ----------
    data : FederatedData
        The run's data: its scenario, seed, source and tuning part.
    devices : int
        Number of tuning devices (:data:`TUNE_DEVICES`); each streams every tuning original,
        in its own seeded domain order and draws.

    Raises
    ------
    ValueError
        ``data`` without originals (ImageNet-C), fewer than 1 device, or a tuning part too small
        for a batch pair (< 2 originals).
    """

    def __init__(self, data: FederatedData, devices: int = TUNE_DEVICES) -> None:
        if not isinstance(data, FederatedData):
            raise ConfigError(f"a tuning split needs a dataset of originals (digits, CIFAR), not {type(data).__name__}")
        if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or devices < 1:
            raise ConfigError(f"tuning devices={devices!r} must be an integer >= 1")
        self.originals = data.split.tune
        if len(self.originals) < online.PAIR:
            raise ConfigError(f"the tuning part of {data.dataset.name} holds {len(self.originals)} originals; a "
                              f"batch pair needs >= {online.PAIR} (use a larger dataset)")
        self.data, self.scenario, self.seed, self.num_devices = data, data.scenario, data.seed, int(devices)

    def device_name(self, device: int) -> str:
        """``tune-<device>``: how reports name tuning device ``device``."""
        return f"{TUNE_DEVICE_PREFIX}{self._check(device)}"

    def device_domains(self, device: int) -> tuple[str, ...]:
        """Tuning device ``device``'s cycle of domains, drawn under :data:`TAG_TUNE_ORDER`."""
        return online.device_domains(self.scenario, self.seed, self._check(device), tag=TAG_TUNE_ORDER)

    def stream_originals(self, device: int, index: int) -> np.ndarray:
        """The tuning originals behind batch ``index`` of tuning device ``device`` (indices only)."""
        key = (self.seed, TAG_TUNE_BATCH, self._check(device))
        return online.batch_originals(self.originals, self.scenario.stream_batch, key, check_index(index))

    def stream_batch(self, device: int, index: int) -> StreamBatch:
        """Batch ``index`` of tuning device ``device``: tuning originals only, own seeds.

        The same recipe as ``FederatedData.stream_batch`` (domain by index, pairs disjoint by
        original, one render seed per sample), keyed (seed, 62, device) for the draw
        (:meth:`stream_originals`) and (seed, 63, device, index, sample) for the renders.
        """
        t, i = self._check(device), check_index(index)
        scenario = self.scenario
        domain = online.batch_domain(self.device_domains(t), i, scenario.batches_per_domain)
        originals = self.stream_originals(t, i)
        seeds = seed_rows(self.seed, TAG_TUNE_STREAM, t, i, np.arange(len(originals)))
        data = self.data
        x = render_in_domains(data.source, originals, seeds, data.dataset.augment, [domain] * len(originals),
                              scenario.severity)
        return StreamBatch(x=x, y=data.source.labels[originals], domain=domain, index=i, originals=originals,
                           seeds=seeds)

    def describe(self) -> str:
        """One sentence for a search's output: which devices and originals it tuned on."""
        names = ", ".join(self.device_name(t) for t in range(self.num_devices))
        return (f"tuning split: device(s) {names} (own domain orders, draws and renders) streaming the "
                f"{len(self.originals)} tuning originals of {self.data.dataset.name} (seed {self.seed}); the "
                f"evaluated devices 0..{self.data.num_devices - 1} hold none of them (they stream the other "
                f"{len(self.data.split.edge)} edge originals)")

    def _check(self, device: int) -> int:
        if isinstance(device, bool) or not isinstance(device, (int, np.integer)) or not 0 <= device < self.num_devices:
            raise ValueError(f"tuning device={device!r} is out of range [0, {self.num_devices})")
        return int(device)
