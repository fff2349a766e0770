"""What the data room hands out: a device's arrays, and their conversion for a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLEAN = "clean"  # domain name of uncorrupted data
PIXEL_MEAN = 0.5  # to_tensor maps [0, 255] to [-1, 1]: (x / 255 - 0.5) / 0.5
PIXEL_STD = 0.5


@dataclass(frozen=True)
class DeviceData:
    """One device's data at one time slot.

    Attributes
    ----------
    train_x : np.ndarray
        uint8 images, (n_k, 32, 32, 3) NHWC.
    train_y : np.ndarray
        int64 labels, (n_k,).
    test_x : np.ndarray
        uint8 local held-out images, (test_size, 32, 32, 3), rendered from TEST originals
        with the label mix of ``train_y``, in the slot's domain.
    test_y : np.ndarray
        int64 labels, (test_size,).
    domain : str
        The slot's domain: ``"clean"`` or a corruption name. Training samples keep the
        domain of the slot in which they were drawn, so older samples may differ.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    domain: str


@dataclass(frozen=True)
class StreamBatch:
    """One batch of a device's online test-time stream (CEMA setting).

    Attributes
    ----------
    x : np.ndarray
        uint8 images, (stream_batch, 32, 32, 3) NHWC; the stream is unlabeled.
    y : np.ndarray
        int64 labels, (stream_batch,): for measuring accuracy only, never for adapting.
    domain : str
        The batch's domain: ``"clean"`` or a corruption name.
    index : int
        Position of the batch in the device's stream (0, 1, ...).
    originals : np.ndarray or None
        Original image behind every sample (index into the dataset's originals), so a batch's
        provenance can be checked (pairs disjoint, tuning apart from evaluation); None where
        the source has no such index (ImageNet-C files).
    seeds : np.ndarray or None
        (stream_batch, parts) seed row of every sample's render: it names the stream (its seed
        tag), the device, the batch and the sample; None where nothing is rendered.
    """

    x: np.ndarray
    y: np.ndarray
    domain: str
    index: int
    originals: np.ndarray | None = None
    seeds: np.ndarray | None = None


def to_tensor(x: np.ndarray):
    """Convert uint8 NHWC images to a float32 NCHW tensor in [-1, 1].

    Parameters
    ----------
    x : np.ndarray
        uint8 images, shape (N, H, W, C).

    Returns
    -------
    torch.Tensor
        ``(x / 255 - 0.5) / 0.5``, float32, shape (N, C, H, W), contiguous.
    """
    import torch

    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(
            f"to_tensor needs uint8 images of shape (N, H, W, C), got {x.dtype} {x.shape}; "
            "pass DeviceData.train_x / test_x or FederatedData.proxy()[0]"
        )
    scaled = (x.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(0, 3, 1, 2)))
