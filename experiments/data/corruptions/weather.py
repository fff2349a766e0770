"""Weather corruptions of CIFAR-10-C: snow, frost and fog.

Every function here is a :data:`experiments.data.corruptions.Corruption`.

Severity constants, copied from ``make_cifar_c.py`` (values for severities 1 | 2 | 3 | 4 | 5)::

    snow               (loc, scale, zoom, threshold, streak radius, streak sigma, blend);
                       streak angle ~ U(-135, -45) degrees
                       (0.1, 0.2, 1, 0.6, 8, 3, 0.95) | (0.1, 0.2, 1, 0.5, 10, 4, 0.9) |
                       (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9) | (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85) |
                       (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)
    frost              (image weight, frost weight)
                       (1, 0.2) | (1, 0.3) | (0.9, 0.4) | (0.85, 0.4) | (0.75, 0.45)
    fog                (thickness, plasma wibble decay)
                       (0.2, 3) | (0.5, 3) | (0.75, 2.5) | (1, 2) | (1.5, 1.75)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from experiments.data.corruptions.blur import _clipped_zoom, _directional_blur

# ----------------------------------------------------------------- severity tables (make_cifar_c.py)
SNOW = (  # (loc, scale, zoom, threshold, blur radius, blur sigma, blend)
    (0.1, 0.2, 1.0, 0.6, 8, 3.0, 0.95),
    (0.1, 0.2, 1.0, 0.5, 10, 4.0, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4.0, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6.0, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12.0, 0.8),
)
SNOW_ANGLE_DEG = (-135.0, -45.0)  # np.random.uniform(-135, -45): streaks fall downwards
SNOW_GREY_GAIN = 1.5  # reference: max(x, grey * 1.5 + 0.5) whitens the scene
SNOW_GREY_LIFT = 0.5
FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # (image, frost) weights
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))  # (thickness, wibble decay)

# ----------------------------------------------------------------- fixed parts of the recipe
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # cv2.COLOR_RGB2GRAY (ITU-R BT.601 luma)
PLASMA_START_WIBBLE = 100.0  # reference plasma_fractal(): wibble = 100

# ----------------------------------------------------------------- frost substitute (our choice)
FROST_TINT = np.array([0.80, 0.90, 1.00])  # blue-white cast of the reference's frost photos
FROST_HAZE_SIGMAS_PX = (4.0, 1.0)  # cloudy ice and fine grain, at 32x32
FROST_HAZE_WEIGHTS = (0.7, 0.3)
FROST_HAZE_MEAN = 0.45  # with the needles: texture mean ~0.46, a light, washed-out overlay
FROST_HAZE_STD = 0.12
FROST_NEEDLES_PER_KILOPIXEL = 8  # needles per 1024 pixels (8 on a 32x32 image)
FROST_NEEDLE_LENGTH_PX = (4.0, 14.0)
FROST_NEEDLE_BRIGHTNESS = (0.5, 1.0)
FROST_BRANCHES_PER_NEEDLE = 2
FROST_BRANCH_ANGLE_RAD = np.pi / 3  # hexagonal ice grows side branches at 60 degrees
FROST_BRANCH_LENGTH_RATIO = (0.3, 0.6)
FROST_BRANCH_POSITION = (0.2, 0.8)  # where along its needle a branch starts (fraction)
FROST_RASTER_STEP_PX = 0.5
FROST_GLOW_SIGMA_PX = 0.5
FROST_GLOW_GAIN = 1.5
FROST_CRYSTAL_WEIGHT = 0.5


def _snow(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Falling snow: thresholded zoomed noise, streaked, on a whitened scene (reference ``snow``).

    The streaks use :func:`_directional_blur` in place of wand's motion blur.
    """
    loc, scale, zoom, threshold, radius, sigma, blend = SNOW[level]
    flakes = rng.normal(loc, scale, size=x.shape[:3])
    flakes = _clipped_zoom(flakes, zoom)
    flakes = np.clip(np.where(flakes < threshold, 0.0, flakes), 0.0, 1.0)
    angles = rng.uniform(*SNOW_ANGLE_DEG, size=len(x))
    flakes = _directional_blur(flakes, radius, sigma, angles)[..., None]
    grey = (x @ GREY_WEIGHTS)[..., None]
    whitened = np.maximum(x, grey * SNOW_GREY_GAIN + SNOW_GREY_LIFT)
    scene = blend * x + (1 - blend) * whitened
    return scene + flakes + flakes[:, ::-1, ::-1]


def _frost(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Blend with a frost texture: ``a * x + b * frost`` (reference ``frost``).

    The reference crops one of its frost photographs; here :func:`_frost_texture` generates
    a procedural substitute from ``rng``.
    """
    image_weight, frost_weight = FROST[level]
    return image_weight * x + frost_weight * _frost_texture(x.shape[:3], rng)


def _frost_texture(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Procedural frost: smooth haze plus glowing, branching ice needles, tinted blue-white.

    Returns an ``(N, H, W, 3)`` texture in [0, 1]: mean about 0.46, std about 0.17 (measured).
    """
    haze = np.zeros(shape)
    for sigma, weight in zip(FROST_HAZE_SIGMAS_PX, FROST_HAZE_WEIGHTS):
        grain = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0, sigma, sigma), mode="wrap")
        grain /= grain.std(axis=(1, 2), keepdims=True)
        haze += weight * grain
    haze = FROST_HAZE_MEAN + FROST_HAZE_STD * haze / np.sqrt(np.sum(np.square(FROST_HAZE_WEIGHTS)))
    needles = _ice_needles(shape, rng)
    glow = ndimage.gaussian_filter(needles, sigma=(0, FROST_GLOW_SIGMA_PX, FROST_GLOW_SIGMA_PX))
    crystals = np.clip(np.maximum(needles, FROST_GLOW_GAIN * glow), 0.0, 1.0)
    texture = np.clip(haze + FROST_CRYSTAL_WEIGHT * crystals, 0.0, 1.0)
    return texture[..., None] * FROST_TINT


def _ice_needles(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Rasterise random straight needles, each with side branches at +-60 degrees, per image."""
    n, h, w = shape
    count = max(1, round(FROST_NEEDLES_PER_KILOPIXEL * h * w / 1024))
    starts = rng.uniform((0, 0), (h, w), size=(n, count, 2))
    angles = rng.uniform(0, 2 * np.pi, size=(n, count))
    lengths = rng.uniform(*FROST_NEEDLE_LENGTH_PX, size=(n, count))
    brightness = rng.uniform(*FROST_NEEDLE_BRIGHTNESS, size=(n, count))
    branch_shape = (n, count, FROST_BRANCHES_PER_NEEDLE)
    along = rng.uniform(*FROST_BRANCH_POSITION, size=branch_shape) * lengths[..., None]
    side = rng.choice((-1.0, 1.0), size=branch_shape)
    branch_angles = angles[..., None] + side * FROST_BRANCH_ANGLE_RAD
    branch_starts = starts[..., None, :] + along[..., None] * _unit(angles)[..., None, :]
    branch_lengths = rng.uniform(*FROST_BRANCH_LENGTH_RATIO, size=branch_shape) * lengths[..., None]
    segments = (
        np.concatenate([starts, branch_starts.reshape(n, -1, 2)], axis=1),
        np.concatenate([angles, branch_angles.reshape(n, -1)], axis=1),
        np.concatenate([lengths, branch_lengths.reshape(n, -1)], axis=1),
        np.concatenate([brightness, np.repeat(brightness, FROST_BRANCHES_PER_NEEDLE, axis=1)], axis=1),
    )
    return _rasterise_segments(shape, *segments)


def _unit(angles: np.ndarray) -> np.ndarray:
    """Unit (row, col) direction vectors of ``angles`` (radians), stacked on a last axis."""
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1)


def _rasterise_segments(
    shape: tuple[int, int, int], starts: np.ndarray, angles: np.ndarray,
    lengths: np.ndarray, brightness: np.ndarray,
) -> np.ndarray:
    """Draw ``(N, M)`` segments into an ``(N, H, W)`` canvas, keeping the brightest per pixel."""
    n, h, w = shape
    steps = int(np.ceil(FROST_NEEDLE_LENGTH_PX[1] / FROST_RASTER_STEP_PX)) + 1
    fraction = np.linspace(0.0, 1.0, steps)
    points = starts[:, :, None, :] + (lengths[..., None] * fraction)[..., None] * _unit(angles)[:, :, None, :]
    rows, cols = np.rint(points[..., 0]).astype(int), np.rint(points[..., 1]).astype(int)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    image_index = np.broadcast_to(np.arange(n)[:, None, None], rows.shape)
    values = np.broadcast_to(brightness[..., None], rows.shape)
    canvas = np.zeros(shape)
    np.maximum.at(canvas, (image_index[inside], rows[inside], cols[inside]), values[inside])
    return canvas


def _fog(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Add a plasma-fractal haze and rescale to the image's peak (reference ``fog``)."""
    thickness, decay = FOG[level]
    n, h, w = x.shape[:3]
    size = 1 << (max(h, w) - 1).bit_length()  # the fractal needs a power-of-two side
    haze = _plasma_fractal(n, size, decay, rng)[:, :h, :w, None]
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + thickness * haze) * peak / (peak + thickness)


def _plasma_fractal(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` diamond-square height maps of side ``size`` (a power of two), scaled to [0, 1].

    Re-implements the reference ``plasma_fractal`` (after FLHerne/mapgen ``diamondsquare.py``):
    each new point is the mean of its 4 neighbours (wrapping around) plus
    ``wibble * U(-wibble, wibble)``; wibble starts at 100 and is divided by ``decay`` per level.
    """
    heights = np.zeros((n, size, size))
    step, wibble = size, PLASMA_START_WIBBLE

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, size=total.shape)

    while step >= 2:
        half = step // 2
        corners = heights[:, ::step, ::step]
        square = corners + np.roll(corners, -1, axis=1)
        heights[:, half::step, half::step] = wibbled_mean(square + np.roll(square, -1, axis=2))
        centres = heights[:, half::step, half::step]
        corners = heights[:, ::step, ::step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        heights[:, ::step, half::step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        heights[:, half::step, ::step] = wibbled_mean(top)
        step, wibble = half, wibble / decay
    heights -= heights.min(axis=(1, 2), keepdims=True)
    return heights / heights.max(axis=(1, 2), keepdims=True)
