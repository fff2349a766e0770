"""The data room: offline datasets, their split, partitions and per-device streams.

Public API
----------
``build_federated_data(dataset, scenario, num_devices, seed) -> FederatedData``
    Cached per process; lazy (nothing rendered until asked). ``dataset.name=imagenet_c``
    gives ``imagenet_c.ImageNetCData`` instead: online streams read from an ImageNet-C
    tree on disk, the same ``stream_batch`` / ``device_domains`` / ``global_test`` surface.
``FederatedData.proxy()``, ``.global_test(slot=None)``, ``.device(partition_id, slot=0)``,
``.sizes()``, ``.num_classes``, ``.image_shape``
``DeviceData``
    train_x, train_y, test_x, test_y (uint8 NHWC / int64) and the slot's domain.
``FederatedData.stream_batch(partition_id, index) -> StreamBatch``, ``.device_domains(partition_id)``
    The online test-time stream (CEMA, ElasticDNN): batch ``index`` of a device, and its domain
    cycle; batches 2m and 2m+1 share no original (``.stream_originals`` gives them, indices only).
``tuning.TuningStreams(data, devices)``
    The tuning split: tuning devices streaming originals no device of any run holds
    (``FederatedData.split.tune``), for hyper-parameter searches.
``to_tensor(x)``
    uint8 NHWC -> float32 NCHW in [-1, 1].
"""

from experiments.data.arrays import CLEAN, DeviceData, StreamBatch, to_tensor
from experiments.data.federated import FederatedData, build_federated_data
from experiments.data.rendering import slot_domain

__all__ = [
    "CLEAN",
    "DeviceData",
    "FederatedData",
    "StreamBatch",
    "build_federated_data",
    "slot_domain",
    "to_tensor",
]
