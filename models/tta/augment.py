"""CoTTA's test-time augmentation: one random photometric + geometric + noise transform of a batch.

qinenergy/cotta ``get_tta_transforms`` (``cifar/cotta.py``, ``imagenet/cotta.py``, ``soft=False``,
``gaussian_std=0.005``) on images in [0, 1]: clip; colour jitter (brightness, contrast, saturation,
hue, gamma, in a random order, ``my_transforms.ColorJitterPro``); edge padding by half the image
size; a random affine map (rotation, translation, scale; bilinear); a Gaussian blur; the centre
crop back to the image size; a horizontal flip; Gaussian noise; clip. One draw of the random
parameters transforms the whole batch, as the reference's transforms do on a batch tensor.

Every random number comes from the ``generator`` argument, drawn in the reference's order with
the reference's calls (``torch.randperm``, ``uniform_``, ``torch.rand``, ``torch.randn``), so a
generator seeded like the reference's global generator gives the reference's augmentation.
The operations are torchvision's own functional transforms.
"""

from __future__ import annotations

import torch
from torch import Tensor

# get_tta_transforms(soft=False): ColorJitterPro ranges.
BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.7, 1.3)
SATURATION = (0.5, 1.5)
HUE = (-0.06, 0.06)
GAMMA = (0.7, 1.3)
# my_transforms.ColorJitterPro clamps to [1e-8, 1] before the gamma correction (NaN guard).
GAMMA_FLOOR = 1e-8
# RandomAffine(degrees=[-15, 15], translate=(1/16, 1/16), scale=(0.9, 1.1), shear=None, BILINEAR).
DEGREES = (-15.0, 15.0)
TRANSLATE = 1 / 16
SCALE = (0.9, 1.1)
# GaussianBlur(kernel_size=5, sigma=[0.001, 0.5]); RandomHorizontalFlip(p=0.5); GaussianNoise(0, 0.005).
BLUR_KERNEL = 5
BLUR_SIGMA = (0.001, 0.5)
FLIP_PROB = 0.5
NOISE_STD = 0.005
#: The project's input convention: ``experiments/data/arrays.py`` ``to_tensor`` maps pixels to [-1, 1]
#: as ``(x / 255 - 0.5) / 0.5`` (restated because ``models`` imports nothing of ``experiments``). The
#: reference transforms pixels in [0, 1], so the batch is mapped there and back.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
#: The colour operations in ColorJitterPro's order of indices (its ``torch.randperm(5)`` permutes these).
COLOR_OPS = ("brightness", "contrast", "saturation", "hue", "gamma")
COLOR_RANGES = {"brightness": BRIGHTNESS, "contrast": CONTRAST, "saturation": SATURATION, "hue": HUE,
                "gamma": GAMMA}


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator).item())


def color_jitter(img: Tensor, generator: torch.Generator) -> Tensor:
    """The five colour operations in a random order, each with a uniform random factor."""
    from torchvision.transforms import functional as TF  # lazy: torchvision costs a second of imports

    adjust = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for index in torch.randperm(len(COLOR_OPS), generator=generator).tolist():
        op = COLOR_OPS[index]
        factor = _uniform(*COLOR_RANGES[op], generator)
        if op == "gamma":
            img = TF.adjust_gamma(img.clamp(GAMMA_FLOOR, 1.0), factor)
        else:
            img = adjust[op](img, factor)
    return img


def random_affine(img: Tensor, generator: torch.Generator) -> Tensor:
    """Rotation, translation (up to 1/16 of the padded size) and scale; bilinear, zero fill."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    height, width = img.shape[-2:]
    angle = _uniform(*DEGREES, generator)
    max_dx, max_dy = TRANSLATE * width, TRANSLATE * height
    shift = [int(round(_uniform(-max_dx, max_dx, generator))), int(round(_uniform(-max_dy, max_dy, generator)))]
    scale = _uniform(*SCALE, generator)
    fill = [0.0] * img.shape[-3]
    return TF.affine(img, angle, shift, scale, [0.0, 0.0], interpolation=InterpolationMode.BILINEAR, fill=fill)


def cotta_augment(x: Tensor, generator: torch.Generator, pixel_mean: float = PIXEL_MEAN,
                  pixel_std: float = PIXEL_STD) -> Tensor:
    """One CoTTA augmentation of the batch ``x`` (module docstring), in ``x``'s own scaling.

    Parameters
    ----------
    x : Tensor
        Images ``(N, C, H, W)`` scaled as ``(pixels - pixel_mean) / pixel_std`` with pixels in [0, 1].
    generator : torch.Generator
        Source of every random number (module docstring).
    pixel_mean, pixel_std : float
        The input scaling (:data:`PIXEL_MEAN`, :data:`PIXEL_STD`; 0 and 1 for inputs in [0, 1]).
    """
    from torchvision.transforms import functional as TF

    if x.dim() != 4:
        raise ValueError(f"CoTTA's augmentations take image batches (N, C, H, W), got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    img = (x * pixel_std + pixel_mean).clamp(0.0, 1.0)
    img = color_jitter(img, generator)
    img = TF.pad(img, [int(height / 2)], padding_mode="edge")
    img = random_affine(img, generator)
    sigma = _uniform(*BLUR_SIGMA, generator)
    img = TF.gaussian_blur(img, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
    img = TF.center_crop(img, [height, width])
    if torch.rand(1, generator=generator) < FLIP_PROB:
        img = TF.hflip(img)
    img = img + torch.randn(img.shape, generator=generator).to(img.device) * NOISE_STD
    img = img.clamp(0.0, 1.0)
    return (img - pixel_mean) / pixel_std
