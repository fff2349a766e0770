"""Digital corruptions of CIFAR-10-C: brightness, contrast, elastic transform, pixelate, JPEG.

Every function here is a :data:`experiments.data.corruptions.Corruption`.

Severity constants, copied from ``make_cifar_c.py`` (values for severities 1 | 2 | 3 | 4 | 5)::

    brightness         shift of the HSV value
                       0.05 | 0.1 | 0.15 | 0.2 | 0.3
    contrast           factor about each channel's mean
                       0.75 | 0.5 | 0.4 | 0.3 | 0.15
    elastic_transform  (alpha, sigma, affine jitter) as fractions of the side (IMSIZE = 32)
                       (0, 0, 0.08) | (0.05, 0.2, 0.07) | (0.08, 0.06, 0.06) | (0.1, 0.04, 0.05) |
                       (0.1, 0.03, 0.03)
    pixelate           box-downscale factor (Pillow)
                       0.95 | 0.9 | 0.85 | 0.75 | 0.65
    jpeg_compression   JPEG quality (Pillow)
                       80 | 65 | 58 | 50 | 40
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

# ----------------------------------------------------------------- severity tables (make_cifar_c.py)
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
ELASTIC_TRANSFORM = (  # (alpha, sigma, affine jitter) as fractions of the side (IMSIZE = 32)
    (0.0, 0.0, 0.08),
    (0.05, 0.2, 0.07),
    (0.08, 0.06, 0.06),
    (0.1, 0.04, 0.05),
    (0.1, 0.03, 0.03),
)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
JPEG_QUALITY = (80, 65, 58, 50, 40)

# ----------------------------------------------------------------- fixed parts of the recipe
ELASTIC_AFFINE_SQUARE_DIVISOR = 3  # reference: square_size = min(shape) // 3
ELASTIC_FIELD_TRUNCATE = 3.0  # reference: gaussian(..., mode="reflect", truncate=3)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Map a [0, 1] float image to uint8, rounding (the reference truncates with np.uint8).

    Pillow needs uint8 (pixelate, JPEG); :func:`experiments.data.corruptions.corrupt` also ends with it.
    """
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _brightness(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Raise the HSV value by ``BRIGHTNESS`` (reference ``brightness``), in closed form.

    With hue and saturation fixed, HSV -> RGB is linear in the value V = max(R, G, B), so the
    reference's rgb2hsv / V += c / hsv2rgb round trip equals scaling the pixel by V' / V,
    and a black pixel (V = 0, saturation 0) becomes grey V'.
    """
    value = x.max(axis=3, keepdims=True)
    brighter = np.minimum(value + BRIGHTNESS[level], 1.0)
    scale = np.divide(brighter, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * scale, brighter)


def _contrast(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Shrink each channel towards its image mean by ``CONTRAST`` (reference ``contrast``)."""
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * CONTRAST[level] + means


def _elastic_transform(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Random affine warp, then a smoothed random displacement field (reference ``elastic_transform``)."""
    n, h, w = x.shape[:3]
    alpha, sigma, jitter = (min(h, w) * fraction for fraction in ELASTIC_TRANSFORM[level])
    out = np.empty_like(x)
    for i in range(n):
        warped = _random_affine(x[i], rng.uniform(-jitter, jitter, size=(3, 2)))
        out[i] = _displace(warped, rng.uniform(-1, 1, size=(2, h, w)), alpha, sigma)
    return out


def _random_affine(image: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """Warp by the affine map moving three points around the centre by ``jitter`` (x, y).

    Re-implements ``cv2.getAffineTransform`` + ``cv2.warpAffine`` (bilinear, reflect-101 edges).
    """
    h, w = image.shape[:2]
    centre = np.array([w // 2, h // 2], dtype=float)
    reach = min(h, w) // ELASTIC_AFFINE_SQUARE_DIVISOR
    source = np.array([centre + reach, [centre[0] + reach, centre[1] - reach], centre - reach])
    target = source + jitter
    forward = np.linalg.solve(np.column_stack([source, np.ones(3)]), target).T  # 2x3, (x, y) -> (x, y)
    linear_inverse = np.linalg.inv(forward[:, :2])
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    points = np.stack([cols - forward[0, 2], rows - forward[1, 2]])
    src_x, src_y = np.tensordot(linear_inverse, points, axes=1)
    return _sample(image, src_y, src_x, mode="mirror")


def _displace(image: np.ndarray, field: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """Resample at pixel + ``alpha`` * Gaussian-smoothed ``field`` (rows: field[1], cols: field[0])."""
    if alpha == 0:
        return image
    dx, dy = (alpha * ndimage.gaussian_filter(f, sigma, mode="reflect", truncate=ELASTIC_FIELD_TRUNCATE)
              for f in field)
    rows, cols = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    return _sample(image, rows + dy, cols + dx, mode="reflect")


def _sample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Bilinear samples of an ``(H, W, C)`` image at fractional ``(rows, cols)``, all channels."""
    channels = image.shape[2]
    coords = np.stack(np.broadcast_arrays(rows[..., None], cols[..., None], np.arange(channels)))
    return ndimage.map_coordinates(image, coords, order=1, mode=mode)


def _pixelate(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Box-downscale by ``PIXELATE`` and box-upscale back with Pillow (reference ``pixelate``)."""
    n, h, w = x.shape[:3]
    small = (max(1, int(w * PIXELATE[level])), max(1, int(h * PIXELATE[level])))
    images = [Image.fromarray(image) for image in _to_uint8(x)]
    return np.stack([
        np.asarray(image.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX))
        for image in images
    ]) / 255.0


def _jpeg_compression(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Encode and decode as JPEG at ``JPEG_QUALITY`` with Pillow (reference ``jpeg_compression``)."""
    decoded = []
    for image in _to_uint8(x):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY[level])
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(decoded) / 255.0
