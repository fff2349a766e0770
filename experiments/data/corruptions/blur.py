"""Blur corruptions of CIFAR-10-C: defocus, glass, motion and zoom blur.

Every function here is a :data:`experiments.data.corruptions.Corruption`.

The directional (motion) kernel and the centre zoom also serve ``snow`` in :mod:`.weather`.

Severity constants, copied from ``make_cifar_c.py`` (values for severities 1 | 2 | 3 | 4 | 5)::

    defocus_blur       (disk radius px, anti-alias sigma)
                       (0.3, 0.4) | (0.4, 0.5) | (0.5, 0.6) | (1, 0.2) | (1.5, 0.1)
    glass_blur         (sigma, max_delta, iterations)
                       (0.05, 1, 1) | (0.25, 1, 1) | (0.4, 1, 1) | (0.25, 1, 2) | (0.4, 1, 2)
    motion_blur        (radius, sigma); angle ~ U(-45, 45) degrees
                       (6, 1) | (6, 1.5) | (6, 2) | (8, 2) | (9, 2.5)
    zoom_blur          zoom factors np.arange(1, stop, 0.01), stop =
                       1.06 | 1.11 | 1.16 | 1.21 | 1.26
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# ----------------------------------------------------------------- severity tables (make_cifar_c.py)
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (radius, alias sigma)
GLASS_BLUR = ((0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2))  # (sigma, iterations)
GLASS_BLUR_MAX_DELTA = 1  # the reference's max_delta, 1 at every severity
MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # (radius, sigma)
MOTION_BLUR_ANGLE_DEG = (-45.0, 45.0)  # np.random.uniform(-45, 45)
ZOOM_BLUR_STOP = (1.06, 1.11, 1.16, 1.21, 1.26)  # zoom factors np.arange(1, stop, ZOOM_BLUR_STEP)
ZOOM_BLUR_STEP = 0.01

# ----------------------------------------------------------------- fixed parts of the recipe
SKIMAGE_GAUSSIAN_TRUNCATE = 4.0  # skimage.filters.gaussian -> scipy default truncate, mode "nearest"
DISK_HALF_WIDTH = 8  # reference disk(): grid np.arange(-8, 8 + 1) for radius <= 8
DISK_ALIAS_TAPS = (3, 5)  # reference disk(): cv2.GaussianBlur ksize 3 (radius <= 8) else 5


def _defocus_blur(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Correlate with an anti-aliased disk (reference ``defocus_blur``; edges reflect-101)."""
    radius, alias_sigma = DEFOCUS_BLUR[level]
    kernel = _disk_kernel(radius, alias_sigma)
    return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """Normalised disk smoothed by a small Gaussian, trimmed to its non-zero support.

    Re-implements the reference ``disk()``: an aliased disk on a ``[-8, 8]`` grid, then
    ``cv2.GaussianBlur`` with a 3-tap (5-tap above radius 8) kernel of the given sigma.
    """
    half = DISK_HALF_WIDTH if radius <= DISK_HALF_WIDTH else int(np.ceil(radius))
    taps = DISK_ALIAS_TAPS[0] if radius <= DISK_HALF_WIDTH else DISK_ALIAS_TAPS[1]
    grid = np.arange(-half, half + 1)
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    disk = (rows**2 + cols**2 <= radius**2).astype(float)
    disk /= disk.sum()
    weights = _cv2_gaussian_taps(taps, alias_sigma)
    smooth = ndimage.correlate1d(disk, weights, axis=0, mode="mirror")
    smooth = ndimage.correlate1d(smooth, weights, axis=1, mode="mirror")
    support = np.flatnonzero(smooth.any(axis=0))
    return smooth[support[0]:support[-1] + 1, support[0]:support[-1] + 1]


def _cv2_gaussian_taps(size: int, sigma: float) -> np.ndarray:
    """``cv2.getGaussianKernel(size, sigma)``: ``exp(-(i - centre)^2 / (2 sigma^2))``, normalised."""
    offsets = np.arange(size) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Spatial Gaussian blur as ``skimage.filters.gaussian`` (mode "nearest", truncate 4)."""
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest",
                                   truncate=SKIMAGE_GAUSSIAN_TRUNCATE)


def _glass_blur(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, shuffle pixels locally ``iterations`` times, blur again (reference ``glass_blur``)."""
    sigma, iterations = GLASS_BLUR[level]
    x = _gaussian_blur(x, sigma)
    for _ in range(iterations):
        x = _local_pixel_shuffle(x, rng)
    return _gaussian_blur(x, sigma)


def _local_pixel_shuffle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One pass of the reference's pixel "swap" loop, as the gather it amounts to.

    The reference visits rows and columns ``d+1 .. side-d`` in decreasing order and runs
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with ``(h', w') = (h + dy, w + dx)`` and
    ``dx, dy = randint(-d, d)`` (upper bound exclusive). On numpy views that tuple "swap" only
    copies: ``x[h, w] = x[h', w']``. With ``d = 1`` every source lies above or left of its target,
    so it is still unvisited when read: the whole pass is ``out[h, w] = x[h + dy, w + dx]``.
    That holds because ``GLASS_BLUR_MAX_DELTA == 1`` at every CIFAR severity.
    """
    n, h, w = x.shape[:3]
    delta = GLASS_BLUR_MAX_DELTA
    rows = np.arange(delta + 1, h - delta + 1)
    cols = np.arange(delta + 1, w - delta + 1)
    dx, dy = rng.integers(-delta, delta, size=(2, n, rows.size, cols.size))
    src_rows = rows[None, :, None] + dy
    src_cols = cols[None, None, :] + dx
    out = x.copy()
    out[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = x[np.arange(n)[:, None, None], src_rows, src_cols]
    return out


def _motion_blur(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Motion blur along a random angle in ``MOTION_BLUR_ANGLE_DEG`` (reference ``motion_blur``).

    Substitute for wand/ImageMagick ``MotionBlurImage``; see :func:`_directional_blur`.
    """
    radius, sigma = MOTION_BLUR[level]
    angles = rng.uniform(*MOTION_BLUR_ANGLE_DEG, size=len(x))
    return _directional_blur(x, radius, sigma, angles)


def _directional_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick's ``MotionBlurImage`` kernel, one angle per image, edge pixels repeated.

    ``width = 2 * ceil(radius) + 1`` taps ``i = 0 .. width-1`` with weights ``exp(-i^2 / 2 sigma^2)``
    (normalised); tap ``i`` reads the pixel ``round(i cos a)`` columns and ``round(i sin a)`` rows
    away (MagickCore/effect.c, ``MotionBlurImage`` and ``GetOptimalKernelWidth1D``).

    Parameters
    ----------
    x : np.ndarray
        ``(N, H, W)`` or ``(N, H, W, C)`` float images.
    radius, sigma : float
        ImageMagick's radius and sigma, in pixels.
    angles_deg : np.ndarray
        ``(N,)`` blur angle of each image, degrees.
    """
    width = 2 * int(np.ceil(radius)) + 1
    taps = np.arange(width)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(angles_deg)[:, None]
    col_shift = np.ceil(taps * np.cos(theta) - 0.5).astype(int)  # (N, width)
    row_shift = np.ceil(taps * np.sin(theta) - 0.5).astype(int)
    n, h, w = x.shape[:3]
    batch = np.arange(n)[:, None, None]
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    out = np.zeros_like(x)
    for tap in range(width):
        src_rows = np.clip(rows + row_shift[:, tap, None, None], 0, h - 1)
        src_cols = np.clip(cols + col_shift[:, tap, None, None], 0, w - 1)
        out += weights[tap] * x[batch, src_rows, src_cols]
    return out


def _zoom_blur(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Average of the image and its centre zooms by ``np.arange(1, stop, 0.01)`` (reference ``zoom_blur``)."""
    factors = np.arange(1.0, ZOOM_BLUR_STOP[level], ZOOM_BLUR_STEP)
    total = x.copy()
    for factor in factors:
        total += _clipped_zoom(x, factor)
    return total / (len(factors) + 1)


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of axes 1 and 2 by ``factor``, keeping their size.

    Reference ``clipped_zoom``: crop ``ceil(side / factor)`` centred, enlarge with
    ``scipy.ndimage.zoom(order=1)`` (output ``round(crop * factor)``, end pixels aligned), trim
    the centre. Bilinear interpolation is separable, so each axis is resampled in turn.
    """
    for axis in (1, 2):
        side = x.shape[axis]
        crop = int(np.ceil(side / factor))
        top = (side - crop) // 2
        zoomed = round(crop * factor)  # Python round, as scipy.ndimage.zoom sizes its output
        trim = (zoomed - side) // 2
        coords = top + np.arange(trim, trim + side) * (crop - 1) / (zoomed - 1)
        x = _linear_resample(x, axis, coords)
    return x


def _linear_resample(x: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``x`` at fractional indices ``coords`` along ``axis``."""
    coords = np.clip(coords, 0, x.shape[axis] - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, x.shape[axis] - 1)
    shape = [1] * x.ndim
    shape[axis] = len(coords)
    frac = (coords - low).reshape(shape)
    return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac
