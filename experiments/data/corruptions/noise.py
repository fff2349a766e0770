"""Noise corruptions of CIFAR-10-C: Gaussian, shot (Poisson) and impulse (salt-and-pepper).

Every function here is a :data:`experiments.data.corruptions.Corruption`.

Severity constants, copied from ``make_cifar_c.py`` (values for severities 1 | 2 | 3 | 4 | 5)::

    gaussian_noise     std of additive noise, image in [0, 1]
                       0.04 | 0.06 | 0.08 | 0.09 | 0.10
    shot_noise         photons per unit intensity (Poisson)
                       500 | 250 | 100 | 75 | 50
    impulse_noise      salt-and-pepper fraction of channel values
                       0.01 | 0.02 | 0.03 | 0.05 | 0.07
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------- severity tables (make_cifar_c.py)
GAUSSIAN_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE_PHOTONS = (500, 250, 100, 75, 50)
IMPULSE_NOISE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)

# ----------------------------------------------------------------- fixed parts of the recipe
IMPULSE_SALT_FRACTION = 0.5  # skimage.util.random_noise(mode="s&p") default salt_vs_pepper


def _gaussian_noise(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of std ``GAUSSIAN_NOISE_STD`` (reference ``gaussian_noise``)."""
    return x + rng.normal(scale=GAUSSIAN_NOISE_STD[level], size=x.shape)


def _shot_noise(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise: ``poisson(x * c) / c`` (reference ``shot_noise``)."""
    photons = SHOT_NOISE_PHOTONS[level]
    return rng.poisson(x * photons) / photons


def _impulse_noise(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise on each channel value independently.

    Re-implements ``skimage.util.random_noise(mode="s&p", amount=c)`` used by the reference:
    a fraction ``c`` of values is replaced, half by 1 (salt) and half by 0 (pepper).
    """
    flipped = rng.random(x.shape) < IMPULSE_NOISE_AMOUNT[level]
    salted = rng.random(x.shape) < IMPULSE_SALT_FRACTION
    return np.where(flipped, salted.astype(x.dtype), x)
