"""scikit-learn's bundled handwritten digits, expanded by label-preserving augmentation.

The 1,797 originals (8x8 greyscale, values 0..16; UCI "Optical Recognition of Handwritten
Digits", shipped inside scikit-learn, so nothing downloads) are upsampled once to a 24x24
digit centred on a 32x32 canvas. Each rendered sample then gets its own small affine
jitter, a stroke-width change and a colour tint, all drawn from a generator seeded by
that sample's seed row, so a sample is a pure function of (original, seed row).
Rendering is batched and costs ~0.06-0.1 ms per image on one CPU core.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from scipy import ndimage

from experiments.schema import AugmentConfig

IMAGE_SIZE = 32  # CIFAR-sized canvas, so the same models run on digits and CIFAR
DIGIT_SIZE = 24  # 8x8 original upsampled 3x; leaves a 4 px margin for shifts and rotation
NUM_CLASSES = 10  # digits 0-9
DIGITS_MAX_VALUE = 16.0  # sklearn digits hold counts 0..16 (UCI optdigits, 4x4 blocks)
UPSAMPLE_ORDER = 3  # cubic spline: smooth strokes from 8x8 blocks
BACKGROUND_MAX = 0.3  # dark background: every channel uniform in [0, 0.3]
INK_MIN = 0.65  # bright ink: every channel uniform in [0.65, 1]; contrast stays >= 0.35
RENDER_CHUNK = 256  # images per vectorised step; keeps the temporaries in cache (measured)
_NUM_PARAMS = 11  # angle, zoom, shift y, shift x, stroke, 3 background, 3 ink channels
#: Where scikit-learn keeps the digits (``sklearn.datasets.load_digits`` reads this file);
#: reading it directly skips importing scikit-learn (1.1-1.6 s of every run's start-up).
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


class DigitsSource:
    """The digits as an image source: labels of the originals and a seeded renderer.

    Attributes
    ----------
    name : str
        ``"digits"``.
    labels : np.ndarray
        int64 label of every original, shape (1797,).
    num_classes : int
        10.
    fixed_test : None
        Digits have no official test split; the test part is drawn by
        ``DatasetConfig.test_fraction``.
    expands : bool
        True: proxy, test and device sets are augmented renders, as many as asked for.
    """

    name = "digits"
    num_classes = NUM_CLASSES
    fixed_test = None
    expands = True

    def __init__(self) -> None:
        self.labels, self._canvas = _load_canvas()

    def render(
        self, originals: np.ndarray, seeds: np.ndarray, augment: AugmentConfig
    ) -> np.ndarray:
        """Render originals as augmented 32x32 RGB images.

        Parameters
        ----------
        originals : np.ndarray
            Indices of originals, shape (N,).
        seeds : np.ndarray
            One seed row per sample, shape (N, L) of non-negative ints; sample ``i`` is
            drawn from ``np.random.default_rng(seeds[i])`` and from nothing else.
        augment : AugmentConfig
            Jitter ranges: rotation +-rotate_deg, zoom +-scale, shift +-translate_px,
            stroke change by a grey dilation (+r) or erosion (-r), r in [-stroke_px,
            stroke_px].

        Returns
        -------
        np.ndarray
            uint8 images, shape (N, 32, 32, 3).
        """
        originals = np.asarray(originals, dtype=np.int64)
        params = draw_params(seeds, len(originals))
        out = np.empty((len(originals), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for start in range(0, len(originals), RENDER_CHUNK):
            chunk = slice(start, start + RENDER_CHUNK)
            ink = change_stroke(self._canvas[originals[chunk]], params[chunk, 4], augment.stroke_px)
            ink = affine_jitter(ink, params[chunk, :4], augment)
            out[chunk] = colourise(ink, params[chunk, 5:8], params[chunk, 8:11])
        return out


@functools.lru_cache(maxsize=1)
def _load_canvas() -> tuple[np.ndarray, np.ndarray]:
    """Load the digits once per process: labels and float32 canvases in [0, 1]."""
    images, labels = read_digits()
    upsample = spline_upsampling_matrix(images.shape[1], DIGIT_SIZE)
    big = (upsample @ (images / DIGITS_MAX_VALUE) @ upsample.T).astype(np.float32)
    margin = (IMAGE_SIZE - DIGIT_SIZE) // 2
    canvas = np.zeros((len(big), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    canvas[:, margin : margin + DIGIT_SIZE, margin : margin + DIGIT_SIZE] = big
    np.clip(canvas, 0.0, 1.0, out=canvas)
    return labels, canvas


def spline_upsampling_matrix(size_in: int, size_out: int, order: int = UPSAMPLE_ORDER) -> np.ndarray:
    """The linear map of ``scipy.ndimage.zoom`` along one axis, as a ``(size_out, size_in)`` matrix.

    Spline zoom is linear and separable, and with ``grid_mode=False`` every output
    coordinate lies inside the input, so zooming an image ``X`` (``size_in`` square) to
    ``size_out`` is ``M @ X @ M.T`` with column ``j`` of ``M`` the zoom of the unit vector
    ``e_j``. One matrix product per image instead of a spline evaluation per pixel: the
    1,797 digits take ~0.01 s instead of ~0.85 s of every run's start-up, equal
    to ``ndimage.zoom`` within float32 rounding (``tests/test_digits.py``).
    """
    return ndimage.zoom(np.eye(size_in), (size_out / size_in, 1.0), order=order)


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 originals (float64, 8x8, values 0..16) and their int64 labels.

    The values of ``sklearn.datasets.load_digits`` (``tests/test_digits.py`` pins them), read
    from scikit-learn's own data file (:data:`DIGITS_FILE`) without importing the package;
    through ``load_digits`` when that file is not where it used to be.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or ()) if spec is not None else []
    path = Path(roots[0]).joinpath(*DIGITS_FILE) if roots else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits  # an install without the file layout above

        digits = load_digits()
        return digits.images, digits.target.astype(np.int64)
    with gzip.open(path, "rt", encoding="utf-8") as text:
        table = np.loadtxt(text, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def draw_params(seeds: np.ndarray, count: int) -> np.ndarray:
    """Draw each sample's augmentation parameters from its own seeded generator.

    Parameters
    ----------
    seeds : np.ndarray
        Seed rows, shape (count, L).
    count : int
        Number of samples; must equal ``len(seeds)``.

    Returns
    -------
    np.ndarray
        Uniforms in [0, 1), shape (count, 11): angle, zoom, shift y, shift x, stroke,
        background RGB, ink RGB.
    """
    seeds = np.asarray(seeds, dtype=np.int64).reshape(count, -1)
    out = np.empty((count, _NUM_PARAMS))
    for i, row in enumerate(seeds.tolist()):
        out[i] = np.random.default_rng(row).random(_NUM_PARAMS)
    return out


def change_stroke(ink: np.ndarray, u: np.ndarray, stroke_px: int) -> np.ndarray:
    """Thicken (grey dilation) or thin (grey erosion) strokes by an integer radius.

    The radius is ``floor(u * (2 * stroke_px + 1)) - stroke_px``, uniform over
    {-stroke_px, ..., stroke_px}; images are processed in groups of equal radius with a
    (1, 2r+1, 2r+1) footprint, so no pixel of one image touches another.
    """
    radius = np.floor(u * (2 * stroke_px + 1)).astype(int) - stroke_px
    out = ink.copy()
    for r in np.unique(radius[radius != 0]):
        group = radius == r
        size = (1, 2 * abs(r) + 1, 2 * abs(r) + 1)
        morph = ndimage.grey_dilation if r > 0 else ndimage.grey_erosion
        out[group] = morph(ink[group], size=size)
    return out


def affine_jitter(ink: np.ndarray, u: np.ndarray, augment: AugmentConfig) -> np.ndarray:
    """Rotate, zoom and shift every image about the canvas centre, in one batched call.

    Output pixel p samples the input at ``c + R(-theta) (p - c - t) / s`` (bilinear,
    zero outside the canvas), with theta, s, t drawn from ``u`` (columns angle, zoom,
    shift y, shift x) within the ranges of ``augment``. For speed the batch is one tall
    2-D image whose canvases are framed by a zero border; clipping the sample positions
    to that border keeps every image's interpolation inside its own frame.
    """
    n, h, w = ink.shape
    theta = np.deg2rad((2 * u[:, 0] - 1) * augment.rotate_deg)
    zoom = 1.0 + (2 * u[:, 1] - 1) * augment.scale
    shift = (2 * u[:, 2:4] - 1) * augment.translate_px
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), axis=-1)
    rel = grid[None].astype(np.float64) - centre - shift[:, None, None, :]
    cos, sin = (np.cos(theta) / zoom)[:, None, None], (np.sin(theta) / zoom)[:, None, None]
    src_y = np.clip(cos * rel[..., 0] + sin * rel[..., 1] + centre[0], -1, h)
    src_x = np.clip(-sin * rel[..., 0] + cos * rel[..., 1] + centre[1], -1, w)
    framed = np.pad(ink, ((0, 0), (1, 1), (1, 1))).reshape(n * (h + 2), w + 2)
    offset = (np.arange(n) * (h + 2) + 1)[:, None, None]
    coords = np.stack([src_y + offset, src_x + 1]).reshape(2, -1)
    out = ndimage.map_coordinates(framed, coords, order=1, mode="constant", cval=0.0)
    return out.reshape(n, h, w)


def colourise(ink: np.ndarray, u_background: np.ndarray, u_ink: np.ndarray) -> np.ndarray:
    """Blend a dark background colour and a bright ink colour by the ink intensity.

    Each sample's background channels are uniform in [0, BACKGROUND_MAX] and its ink
    channels uniform in [INK_MIN, 1], so colour corruptions (brightness, contrast, fog)
    act on real colour while the digit stays clearly readable.
    """
    background = (255.0 * u_background * BACKGROUND_MAX).astype(np.float32)
    colour = (255.0 * (INK_MIN + u_ink * (1.0 - INK_MIN))).astype(np.float32)
    alpha = np.clip(ink, 0.0, 1.0, dtype=np.float32)[..., None]
    rgb = background[:, None, None, :] + alpha * (colour - background)[:, None, None, :]
    return np.rint(rgb, out=rgb).astype(np.uint8)
