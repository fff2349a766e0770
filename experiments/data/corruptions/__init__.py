"""The 15 common corruptions of CIFAR-10-C, at severities 1-5, for small RGB uint8 images.

Reference: D. Hendrycks and T. Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019 (section 3, figure 1); recipe and constants from
``ImageNet-C/create_c/make_cifar_c.py`` in github.com/hendrycks/robustness (commit ca36008).
This is an independent numpy/scipy/Pillow implementation (no scikit-image, OpenCV or
ImageMagick); every random draw comes from the caller's ``np.random.Generator``.

Each family of the paper's figure 1 has its own module, holding the severity tables (each
listed in its module docstring) beside the functions that use them: :mod:`.noise`
(gaussian, shot, impulse), :mod:`.blur` (defocus, glass, motion, zoom), :mod:`.weather`
(snow, frost, fog) and :mod:`.digital` (brightness, contrast, elastic transform, pixelate,
JPEG). This module checks the input, holds the dispatch table and applies it in chunks; each
family function is a :data:`Corruption`: it takes a float batch ``(N, H, W, 3)`` in [0, 1], a
0-based severity index ``level`` and the caller's generator, and returns a float batch, which
:func:`corrupt` clips and converts back to uint8.

Where this implementation departs from the reference (each also said at the function):

* ``frost``: the reference blends in crops of frost photographs; here a procedural texture
  (seeded smooth haze plus blurred, branching ice needles, tinted blue-white) stands in for them.
* ``motion_blur`` and the streaks of ``snow``: the reference calls ImageMagick's
  ``MotionBlurImage`` through wand; here its kernel (a one-sided Gaussian trail of
  ``2 * ceil(radius) + 1`` taps along the angle, edge pixels repeated) is re-implemented in numpy.
* ``glass_blur``: the reference's per-pixel "swap" loop is replaced by the gather it is
  equivalent to (see :func:`.blur._local_pixel_shuffle`), which is vectorised.
* Intermediate 8-bit round trips of the reference (glass blur, the snow layer's PNG) are kept in
  float, and the final conversion rounds to the nearest grey level where the reference truncates.

A property of the reference kept here: ``elastic_transform`` at severity 1 is a pure random
affine warp whose jitter (0.08 x 32 px) exceeds severity 5's (0.03 x 32 px, plus a fine
displacement field), so severity 1 moves pixels more than severity 5 does.

The constants are CIFAR's, tuned for 32x32 images; other sizes of at least ``MIN_SIDE`` pixels
are accepted and use the same pixel constants (elastic: the same fractions of the image side).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from experiments.data.corruptions.blur import _defocus_blur, _glass_blur, _motion_blur, _zoom_blur
from experiments.data.corruptions.digital import (
    _brightness,
    _contrast,
    _elastic_transform,
    _jpeg_compression,
    _pixelate,
    _to_uint8,
)
from experiments.data.corruptions.noise import _gaussian_noise, _impulse_noise, _shot_noise
from experiments.data.corruptions.weather import _fog, _frost, _snow
from experiments.schema import CORRUPTION_SUITE

CORRUPTIONS: tuple[str, ...] = CORRUPTION_SUITE  # Hendrycks & Dietterich 2019, figure 1 order: noise, blur, weather, digital
SEVERITIES = (1, 2, 3, 4, 5)

# ----------------------------------------------------------------- input limits
MIN_SIDE = 8  # below this the 32x32-tuned constants (trails up to 29 px, zoom 2.25x) erase the image
CHUNK_SIZE = 256  # images corrupted per vectorised step: bounds float64 temporaries to ~20 MB

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]  # (batch, level, rng) -> batch


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply one CIFAR-10-C corruption at one severity.

    Parameters
    ----------
    images : np.ndarray
        uint8 RGB image ``(H, W, 3)`` or batch ``(N, H, W, 3)``, with ``H, W >= MIN_SIDE``.
    name : str
        One of :data:`CORRUPTIONS`.
    severity : int
        One of :data:`SEVERITIES` (1 mildest, 5 strongest; Hendrycks & Dietterich 2019).
    rng : np.random.Generator
        Source of every random draw; a batch draws independently for each image.

    Returns
    -------
    np.ndarray
        uint8 array of the input's shape.

    Raises
    ------
    ValueError
        If the name, severity, generator, dtype or shape is not one of the valid choices.
    """
    _check_choice(name, severity, rng)
    batch = _check_images(images)
    corruption = _CORRUPTIONS[name]
    out = np.empty_like(batch)
    for start in range(0, len(batch), CHUNK_SIZE):
        chunk = batch[start:start + CHUNK_SIZE] / 255.0
        out[start:start + CHUNK_SIZE] = _to_uint8(corruption(chunk, int(severity) - 1, rng))
    return out if images.ndim == 4 else out[0]


def _check_choice(name: str, severity: int, rng: np.random.Generator) -> None:
    """Reject an unknown corruption name, a severity outside 1-5, or a non-Generator rng."""
    if not isinstance(name, str) or name not in _CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    is_int = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    if not is_int or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in {SEVERITIES}, got {severity!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a np.random.Generator, got {type(rng).__name__}; "
            "pass np.random.default_rng([seed, ...])"
        )


def _check_images(images: np.ndarray) -> np.ndarray:
    """Return ``images`` as an ``(N, H, W, 3)`` uint8 batch, or raise ValueError."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        kind = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"images must be a uint8 numpy array, got {kind}; convert with .astype(np.uint8)")
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (H, W, 3) or (N, H, W, 3), got {images.shape}")
    if min(images.shape[-3:-1]) < MIN_SIDE:
        raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {images.shape}")
    return images if images.ndim == 4 else images[None]


_CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
