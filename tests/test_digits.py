"""The embedded digits source: loading, seeded label-preserving augmentation, rendering."""

from __future__ import annotations

import time

import numpy as np
import pytest

from experiments.data import digits
from experiments.schema import AugmentConfig

NO_JITTER = AugmentConfig(rotate_deg=0.0, scale=0.0, translate_px=0.0, stroke_px=0)


@pytest.fixture(scope="module")
def source():
    return digits.DigitsSource()


def _seeds(n, seed=0):
    return np.stack([np.full(n, seed), np.arange(n)], axis=1)


def test_the_data_file_read_directly_holds_load_digits_values(monkeypatch):
    from sklearn.datasets import load_digits

    images, labels = digits.read_digits()
    reference = load_digits()
    assert images.shape == (1797, 8, 8) and labels.dtype == np.int64
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)
    monkeypatch.setattr(digits, "DIGITS_FILE", ("no", "such", "file.csv.gz"))  # a future layout: load_digits
    fallback_images, fallback_labels = digits.read_digits()
    assert np.array_equal(fallback_images, images) and np.array_equal(fallback_labels, labels)


def test_reading_the_digits_does_not_import_scikit_learn():
    import subprocess
    import sys

    code = "import sys; from experiments.data import digits; digits.read_digits(); print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_upsampling_matrix_is_scipys_spline_zoom():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(5, 8, 8))
    matrix = digits.spline_upsampling_matrix(8, 24)
    assert matrix.shape == (24, 8)
    # every row interpolates, so a constant image stays constant (the rows sum to 1)
    assert np.allclose(matrix.sum(axis=1), 1.0)
    assert np.allclose(matrix @ images @ matrix.T, ndimage.zoom(images, (1, 3, 3), order=3), atol=1e-12)
    # the canvas the runs use: the originals, upsampled this way, centred and clipped
    _, canvas = digits._load_canvas()
    originals, _ = digits.read_digits()
    reference = np.clip(ndimage.zoom(originals[:50].astype(np.float32) / 16, (1, 3, 3), order=3), 0, 1)
    margin = (digits.IMAGE_SIZE - digits.DIGIT_SIZE) // 2
    assert np.allclose(canvas[:50, margin:-margin, margin:-margin], reference, atol=1e-6)
    assert canvas[:, :margin].max() == 0 and canvas[:, :, -margin:].max() == 0


def test_originals_are_sklearn_digits(source):
    assert source.labels.shape == (1797,)
    assert source.labels.dtype == np.int64
    assert np.bincount(source.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert source.num_classes == 10 and source.fixed_test is None and source.expands


def test_render_shape_dtype_range(source):
    x = source.render(np.arange(50), _seeds(50), AugmentConfig())
    assert x.shape == (50, 32, 32, 3) and x.dtype == np.uint8
    # dark background (<= 0.3 * 255 per channel) and bright ink (>= 0.65 * 255 somewhere)
    assert x[:, 0, 0, :].max() <= round(digits.BACKGROUND_MAX * 255)
    assert (x.reshape(50, -1, 3).max(axis=1) >= 0.6 * 255).all()


def test_render_is_a_function_of_original_and_seed(source):
    originals, seeds = np.arange(20), _seeds(20)
    a = source.render(originals, seeds, AugmentConfig())
    assert np.array_equal(a, source.render(originals, seeds, AugmentConfig()))
    # a sample does not depend on the rest of its batch
    assert np.array_equal(a[7:9], source.render(originals[7:9], seeds[7:9], AugmentConfig()))
    b = source.render(originals, _seeds(20, seed=1), AugmentConfig())
    assert not np.array_equal(a, b)
    assert all(not np.array_equal(a[i], b[i]) for i in range(20))


def test_render_keeps_the_digit_shape(source):
    """Without jitter, grey level is the upsampled original, up to the colour tint."""
    x = source.render(np.arange(10), _seeds(10), NO_JITTER).astype(float).mean(axis=3)
    canvas = source._canvas[:10]
    for image, ink in zip(x, canvas):
        assert np.corrcoef(image.ravel(), ink.ravel())[0, 1] > 0.99
    # with jitter the image still looks like its own original more than like other digits
    y = source.render(np.arange(100), _seeds(100), AugmentConfig()).astype(float).mean(axis=3)
    def similarity(i, j):
        return np.corrcoef(y[i].ravel(), source._canvas[j].ravel())[0, 1]

    same = [similarity(i, i) for i in range(100)]
    other = [similarity(i, (i + 1) % 100) for i in range(100)]
    assert np.mean(same) > np.mean(other) + 0.2


def test_colourise_by_hand():
    ink = np.array([[[0.0, 0.5], [1.0, 2.0]]])  # 2.0 is clipped to full ink
    out = digits.colourise(ink, np.zeros((1, 3)), np.ones((1, 3)))
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    tinted = digits.colourise(ink, np.ones((1, 3)), np.zeros((1, 3)))
    # background 0.3 * 255 = 76.5 -> 76 (half to even), ink 0.65 * 255 = 165.75 -> 166
    assert tinted[0, :, :, 1].tolist() == [[76, 121], [166, 166]]


def test_change_stroke_by_hand():
    ink = np.zeros((3, 7, 7), dtype=np.float32)
    ink[:, 3, 3] = 1.0
    ink[2, 3, 2:5] = 1.0  # a 3-pixel bar
    # stroke_px=1: u in [0, 1/3) -> erosion, [1/3, 2/3) -> unchanged, [2/3, 1) -> dilation
    out = digits.change_stroke(ink, np.array([0.9, 0.5, 0.1]), stroke_px=1)
    assert out[0].sum() == 9 and out[0, 2:5, 2:5].min() == 1.0  # dot grown to 3x3
    assert np.array_equal(out[1], ink[1])
    assert out[2].sum() == 0  # a 1-pixel-thin bar erodes away


def test_affine_jitter_by_hand():
    ink = np.zeros((1, 32, 32), dtype=np.float32)
    ink[0, 5, 15] = 1.0
    aug = AugmentConfig(rotate_deg=90.0, scale=0.1, translate_px=2.0)
    identity = digits.affine_jitter(ink, np.array([[0.5, 0.5, 0.5, 0.5]]), aug)
    assert np.allclose(identity, ink)
    down = digits.affine_jitter(ink, np.array([[0.5, 0.5, 1.0, 0.5]]), aug)  # shift y by +2
    assert down[0, 7, 15] == pytest.approx(1.0) and down.sum() == pytest.approx(1.0)
    # theta = +90 deg about the centre (15.5, 15.5): input (5, 15) lands on (16, 5)
    turned = digits.affine_jitter(ink, np.array([[1.0, 0.5, 0.5, 0.5]]), aug)
    assert turned[0, 16, 5] == pytest.approx(1.0, abs=1e-6) and turned.sum() == pytest.approx(1.0)


def test_affine_jitter_keeps_images_apart():
    """The tall-image trick must not bleed one canvas into its neighbour."""
    ink = np.zeros((2, 32, 32), dtype=np.float32)
    ink[0, 31, :] = 1.0  # bottom row of the first image, right above the second
    shifted_up = np.array([[0.5, 0.5, 0.0, 0.5]] * 2)  # shift y by -2
    out = digits.affine_jitter(ink, shifted_up, AugmentConfig(translate_px=2.0))
    assert out[1].sum() == 0.0 and out[0, 29].min() == pytest.approx(1.0)


def test_render_speed(source):
    """Rendering stays well under the 0.3 ms/image budget (measured ~0.1 ms on 2 cores)."""
    n = 2000
    source.render(np.arange(10), _seeds(10), AugmentConfig())
    start = time.perf_counter()
    source.render(np.arange(n) % 1797, _seeds(n), AugmentConfig())
    assert (time.perf_counter() - start) / n < 0.6e-3
