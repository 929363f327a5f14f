"""``digits-C``: the digits test split under common corruptions at five severities, in the manner of ImageNet-C
(Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR
2019), the target domains of SDA's test-time adaptation (Guo et al., CVPR 2025; condiff.tasks.sda).

Every corruption is a pure function ``f(images, severity, generator) -> images`` of a (B, C, H, W) batch in the
digits' [-1, 1] model units; severity 0 is the identity, 1..5 grow harder; only ``noise`` and ``occlusion`` draw
from ``generator`` (the same generator state gives the same output):

- ``noise``: x + s * z, z ~ N(0, I), s = (0.4, 0.6, 0.8, 1.0, 1.2); not clipped, so the added noise has exactly
  standard deviation s.
- ``blur``: a separable Gaussian kernel of standard deviation (1, 1.5, 2, 2.5, 3) pixels and radius ceil(3 sd),
  normalised to sum 1, with circular padding: every image keeps its mean exactly.
- ``contrast``: m + c (x - m) with m each image's mean and c = (0.5, 0.4, 0.3, 0.2, 0.15): the deviation from the
  mean is scaled by c.
- ``occlusion``: one k x k box, k = (6, 7, 8, 9, 10) pixels, at a uniformly random position inside the image, set
  to 0 (mid-grey; the cutout of DeVries & Taylor 2017 with the mean grey level).

The levels are calibrated on the source classifier only (the digits scorer, on the 150 validation digits of
condiff.models.sda_digits.split): each corruption takes its accuracy from about 0.95 at severity 1 to about 0.35 -
0.65 at severity 5. ImageNet-C's own levels (noise sd 2 x 0.08 .. 2 x 0.38, contrast 0.4 .. 0.05) are too mild for
noise and blur on these 16 x 16 digits: its noise level 5 leaves the scorer at 0.90.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from condiff.errors import ConfigError, check_int, one_of

SEVERITIES = (1, 2, 3, 4, 5)
NOISE_STD = (0.4, 0.6, 0.8, 1.0, 1.2)
BLUR_SD = (1.0, 1.5, 2.0, 2.5, 3.0)
CONTRAST = (0.5, 0.4, 0.3, 0.2, 0.15)
OCCLUSION_SIDE = (6, 7, 8, 9, 10)
OCCLUSION_FILL = 0.0


def _check(images, severity: int) -> int:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ConfigError(
            f"images must be a floating-point (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))!r}"
        )
    return check_int("severity", severity, 0, len(SEVERITIES))


def noise(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive Gaussian noise of standard deviation ``NOISE_STD[severity - 1]`` (not clipped)."""
    if _check(images, severity) == 0:
        return images.clone()
    z = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images + NOISE_STD[severity - 1] * z


def gaussian_kernel(sd: float, dtype=torch.float64) -> torch.Tensor:
    """The 1-D Gaussian kernel of standard deviation ``sd`` on [-ceil(3 sd), ceil(3 sd)], summing to 1."""
    r = max(1, math.ceil(3 * sd))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sd) ** 2)
    return (k / k.sum()).to(dtype)


def blur(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``BLUR_SD[severity - 1]`` pixels, circular padding."""
    if _check(images, severity) == 0:
        return images.clone()
    b, c, h, w = images.shape
    k = gaussian_kernel(BLUR_SD[severity - 1], images.dtype)
    r = (k.numel() - 1) // 2
    x = images.reshape(b * c, 1, h, w)
    # circular padding wraps once; the kernel radius may not exceed the image size
    if r > min(h, w):
        raise ConfigError(f"blur needs images of at least {r} pixels per side, got {h}x{w}")
    x = torch.nn.functional.pad(x, (r, r, 0, 0), mode="circular")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))
    x = torch.nn.functional.pad(x, (0, 0, r, r), mode="circular")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)


def contrast(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """m + c (x - m), m each image's mean over (C, H, W), c = ``CONTRAST[severity - 1]``."""
    if _check(images, severity) == 0:
        return images.clone()
    m = images.mean(dim=(1, 2, 3), keepdim=True)
    return m + CONTRAST[severity - 1] * (images - m)


def occlusion_corners(n: int, side: int, h: int, w: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) top-left corners (row, column) of ``side`` x ``side`` boxes inside an h x w image, uniform."""
    rows = torch.randint(0, h - side + 1, (n,), generator=generator)
    cols = torch.randint(0, w - side + 1, (n,), generator=generator)
    return torch.stack([rows, cols], 1)


def occlusion(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One ``OCCLUSION_SIDE[severity - 1]``-pixel square box per image, uniformly placed, set to 0 in every
    channel; the corners are ``occlusion_corners`` with the same generator."""
    if _check(images, severity) == 0:
        return images.clone()
    b, _, h, w = images.shape
    side = OCCLUSION_SIDE[severity - 1]
    if side > min(h, w):
        raise ConfigError(f"occlusion needs images of at least {side} pixels per side, got {h}x{w}")
    out = images.clone()
    for i, (r, c) in enumerate(occlusion_corners(b, side, h, w, generator).tolist()):
        out[i, :, r : r + side, c : c + side] = OCCLUSION_FILL
    return out


CORRUPTIONS: dict[str, Callable] = {"noise": noise, "blur": blur, "contrast": contrast, "occlusion": occlusion}


def corrupt(name: str, images: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """``CORRUPTIONS[name](images, severity, generator)`` with a generator seeded from (seed, name, severity), so
    every corruption and severity has its own fixed draw."""
    if name not in CORRUPTIONS:
        raise one_of("corruption", name, CORRUPTIONS)
    index = list(CORRUPTIONS).index(name)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + index * 101 + int(severity)) % (2**63 - 1))
    return CORRUPTIONS[name](images, severity, g)
