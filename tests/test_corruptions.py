"""Tests for experiments.data.corruptions (CIFAR-10-C corruptions, Hendrycks & Dietterich 2019)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from experiments.data.corruptions import CORRUPTIONS, SEVERITIES, blur, corrupt

STOCHASTIC = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
              "snow", "frost", "fog", "elastic_transform")
DETERMINISTIC = tuple(name for name in CORRUPTIONS if name not in STOCHASTIC)
SPATIAL = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "elastic_transform", "pixelate")


def rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as 32x32 RGB uint8 (0..16 -> 0..255), and labels."""
    data = load_digits()
    grey = np.kron(data.images, np.ones((1, 4, 4))) * 255 / 16
    return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=-1), data.target


@pytest.fixture(scope="module")
def tinted(digits) -> np.ndarray:
    """32 digits with a seeded ink and background colour each, for colour-aware checks."""
    ink = rng(1).uniform(0.4, 1.0, size=(32, 1, 1, 3))
    paper = rng(2).uniform(0.0, 0.4, size=(32, 1, 1, 3))
    alpha = digits[0][:32] / 255.0
    return np.rint((alpha * ink + (1 - alpha) * paper) * 255).astype(np.uint8)


def test_public_names_and_severities():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression",
    )
    assert SEVERITIES == (1, 2, 3, 4, 5)


# ----------------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("severity", [1, 5])
def test_single_and_batch_keep_shape_and_dtype(name, severity, tinted):
    single = corrupt(tinted[0], name, severity, rng(0))
    batch = corrupt(tinted[:3], name, severity, rng(0))
    assert single.dtype == np.uint8 and single.shape == (32, 32, 3)
    assert batch.dtype == np.uint8 and batch.shape == (3, 32, 32, 3)


@pytest.mark.parametrize("name", ["gaussian_noise", "glass_blur", "snow", "fog", "elastic_transform"])
@pytest.mark.parametrize("severity", SEVERITIES)
def test_every_severity_runs(name, severity, tinted):
    out = corrupt(tinted[:2], name, severity, rng(severity))
    assert out.dtype == np.uint8 and out.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_non_square_and_empty_batches(name):
    images = rng(3).integers(0, 256, size=(2, 24, 40, 3), dtype=np.uint8)
    assert corrupt(images, name, 5, rng(0)).shape == (2, 24, 40, 3)
    assert corrupt(images[:0], name, 5, rng(0)).shape == (0, 24, 40, 3)


def test_input_is_not_modified(tinted):
    images = tinted[:4].copy()
    for name in CORRUPTIONS:
        corrupt(images, name, 5, rng(0))
    np.testing.assert_array_equal(images, tinted[:4])


# ----------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_same_output(name, tinted):
    np.testing.assert_array_equal(corrupt(tinted[:4], name, 3, rng(7)), corrupt(tinted[:4], name, 3, rng(7)))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_different_seed_different_output(name, tinted):
    assert not np.array_equal(corrupt(tinted[:4], name, 3, rng(7)), corrupt(tinted[:4], name, 3, rng(8)))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_ignore_the_seed(name, tinted):
    np.testing.assert_array_equal(corrupt(tinted[:4], name, 3, rng(7)), corrupt(tinted[:4], name, 3, rng(8)))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_batch_images_get_independent_draws(name, tinted):
    out = corrupt(np.repeat(tinted[:1], 3, axis=0), name, 5, rng(4))
    assert not np.array_equal(out[0], out[1]) and not np.array_equal(out[1], out[2])


# ----------------------------------------------------------------- strength
@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "elastic_transform"])
def test_severity_5_moves_pixels_further_than_severity_1(name, tinted):
    # elastic_transform is left out on purpose: in make_cifar_c.py severity 1 is a pure random
    # affine with jitter 0.08 * 32 px, larger than severity 5's 0.03 * 32 px; severity 5 adds a
    # fine displacement field instead, so it moves pixels less in total (not monotonic by design).
    def mad(severity: int) -> float:
        return np.abs(corrupt(tinted, name, severity, rng(11)).astype(float) - tinted).mean()

    assert mad(5) > mad(1)


def test_severity_5_degrades_a_trained_model_more_than_severity_1(digits):
    images, labels = digits
    order = rng(0).permutation(len(images))
    train, test = order[:1000], order[1000:1300]

    def features(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1) / 255.0

    model = LogisticRegression(max_iter=300).fit(features(images[train]), labels[train])
    clean = model.score(features(images[test]), labels[test])
    mean_accuracy = {
        severity: np.mean([
            model.score(features(corrupt(images[test], name, severity, rng(7, severity))), labels[test])
            for name in CORRUPTIONS
        ])
        for severity in (1, 5)
    }
    assert clean > 0.9
    assert mean_accuracy[1] <= clean + 0.01
    assert mean_accuracy[5] < mean_accuracy[1] - 0.03


# ----------------------------------------------------------------- values worked out by hand
def test_contrast_shrinks_towards_channel_mean():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (0, 100, 200)
    image[:, 16:] = (200, 100, 0)  # every channel mean is 100
    out = corrupt(image, "contrast", 5, rng(0))  # factor 0.15: 100 + (v - 100) * 0.15
    np.testing.assert_array_equal(out[0, 0], (85, 100, 115))
    np.testing.assert_array_equal(out[0, 31], (115, 100, 85))


def test_brightness_raises_hsv_value():
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 0] = (100, 50, 0)
    image[0, 1] = (255, 255, 255)
    out = corrupt(image, "brightness", 1, rng(0))  # V += 0.05 at fixed hue and saturation
    np.testing.assert_array_equal(out[0, 0], (113, 56, 0))  # x * (100/255 + .05) / (100/255)
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
    np.testing.assert_array_equal(out[1, 1], (13, 13, 13))  # black -> grey 0.05 * 255 = 12.75


def test_brightness_matches_an_hsv_round_trip():
    image = rng(5).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    out = corrupt(image, "brightness", 5, rng(0))
    for pixel, result in zip(image.reshape(-1, 3) / 255.0, out.reshape(-1, 3)):
        hue, saturation, value = colorsys.rgb_to_hsv(*pixel)
        expected = np.array(colorsys.hsv_to_rgb(hue, saturation, min(value + 0.3, 1.0))) * 255
        assert np.abs(result - expected).max() <= 0.5 + 1e-9


def test_defocus_blur_impulse_response_is_the_disk():
    image = np.zeros((32, 32, 3), np.uint8)
    image[16, 16] = 255
    out = corrupt(image, "defocus_blur", 4, rng(0))[..., 0]  # radius 1: 5-pixel plus, 1/5 each
    expected = np.zeros((32, 32), np.uint8)
    expected[[16, 15, 17, 16, 16], [16, 16, 16, 15, 17]] = 51  # 255 / 5
    np.testing.assert_array_equal(out, expected)


def test_motion_blur_is_a_one_sided_trail_within_45_degrees():
    image = np.zeros((32, 32, 3), np.uint8)
    image[16, 16] = 255
    for seed in range(5):
        out = corrupt(image, "motion_blur", 1, rng(seed))[..., 0]
        # tap 0 weight 1 / sum(exp(-i^2 / 2), i = 0..12) = 0.5703 -> 145.4
        assert out[16, 16] == 145
        rows, cols = np.nonzero(out)
        assert np.all(np.abs(rows - 16) <= 16 - cols)  # trail to the left, angle in (-45, 45)
        assert abs(int(out.sum()) - 255) <= 7  # weights sum to 1; at most 13 taps round by 0.5


def test_fog_scales_to_the_image_peak():
    black = np.zeros((2, 32, 32, 3), np.uint8)
    np.testing.assert_array_equal(corrupt(black, "fog", 5, rng(0)), black)  # peak 0 keeps it black
    white = corrupt(np.full((32, 32, 3), 255, np.uint8), "fog", 5, rng(0))
    assert white.min() == 102 and white.max() == 255  # (1 + 1.5 * [0, 1]) / 2.5 -> 0.4 .. 1


@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_corruptions_keep_a_constant_image(name):
    image = np.full((2, 32, 32, 3), 128, np.uint8)
    np.testing.assert_array_equal(corrupt(image, name, 5, rng(0)), image)


def test_noise_statistics_match_the_severity_table():
    grey = np.full((8, 32, 32, 3), 128, np.uint8)
    gaussian = corrupt(grey, "gaussian_noise", 5, rng(0)).astype(float)
    assert abs(gaussian.std() - 0.10 * 255) < 0.03 * 25.5 and abs(gaussian.mean() - 128) < 0.5
    shot = corrupt(grey, "shot_noise", 5, rng(0)).astype(float)
    assert abs(shot.std() - np.sqrt(128 / 255 / 50) * 255) < 0.03 * 25.5  # Poisson: var = x / c
    impulse = corrupt(grey, "impulse_noise", 5, rng(0))
    assert abs((impulse == 0).mean() - 0.035) < 0.005 and abs((impulse == 255).mean() - 0.035) < 0.005
    assert np.all((impulse == 0) | (impulse == 255) | (impulse == 128))


def test_frost_only_adds_at_full_image_weight(tinted):
    out = corrupt(tinted, "frost", 1, rng(0))  # 1.0 * x + 0.2 * frost
    assert np.all(out >= tinted) and out.mean() > tinted.mean() + 10


def test_glass_pixel_shuffle_equals_the_reference_swap_loop():
    image = rng(6).random((32, 32, 3))

    def reference_loop(x, dx, dy):  # make_cifar_c.py glass_blur loop, max_delta 1, offsets given
        x = x.copy()
        for h in range(31, 1, -1):
            for w in range(31, 1, -1):
                h_prime, w_prime = h + dy[h - 2, w - 2], w + dx[h - 2, w - 2]
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
        return x

    dx, dy = rng(9).integers(-1, 1, size=(2, 1, 30, 30))[:, 0]
    expected = reference_loop(image, dx, dy)
    np.testing.assert_array_equal(blur._local_pixel_shuffle(image[None], rng(9))[0], expected)


# ----------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("name", ["Gaussian Noise", "speckle_noise", "", 3])
def test_unknown_name_lists_the_choices(name, tinted):
    with pytest.raises(ValueError, match="gaussian_noise, shot_noise"):
        corrupt(tinted[0], name, 1, rng(0))


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True, "3"])
def test_bad_severity(severity, tinted):
    with pytest.raises(ValueError, match=r"severity must be an int in \(1, 2, 3, 4, 5\)"):
        corrupt(tinted[0], "fog", severity, rng(0))


@pytest.mark.parametrize("images", [
    np.zeros((32, 32, 3), np.float32),
    np.zeros((32, 32, 3), np.int64),
    [[[0, 0, 0]]],
])
def test_bad_dtype(images):
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images, "fog", 1, rng(0))


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 4), (2, 2, 32, 32, 3), (32, 32, 1), (4, 4, 3)])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match=r"\(H, W, 3\)|at least 8x8"):
        corrupt(np.zeros(shape, np.uint8), "fog", 1, rng(0))


@pytest.mark.parametrize("generator", [None, 0, np.random.RandomState(0)])
def test_rng_must_be_a_generator(generator, tinted):
    with pytest.raises(ValueError, match="np.random.Generator"):
        corrupt(tinted[0], "fog", 1, generator)
