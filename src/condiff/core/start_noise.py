"""Centring the sub-pixel means of the starting noise, for networks that see a pixel-unshuffled image.

A network that runs on a ``f x f`` pixel-unshuffled image (32x32x3 -> 16x16x12 for f = 2) sees each colour
channel as f^2 sub-pixel channels. The spatial mean of each sub-pixel channel of the starting noise x_T is a
Gaussian of variance 1/(H W / f^2); sampling carries ~half of the *differences* between those means through to
the image (measured on the bundled shapes model: correlation 0.86, slope 0.48), where a difference between
sub-pixel means is an f-periodic pattern, i.e. the faint checkerboard and stripes seen in flat backgrounds.
It is the low-frequency leak of a start that is not pure noise, as analysed by Lin et al., "Common Diffusion
Noise Schedules and Sample Steps are Flawed" (WACV 2024, Sec. 3.1): the network keeps what x_T's lowest
frequencies say instead of predicting them from the data.

``centre_subpixel_means`` removes those differences and keeps each colour channel's overall mean: per image and
channel it subtracts from every sub-pixel phase its own spatial mean and adds back the mean over phases. It
projects out C (f^2 - 1) of the C H W noise dimensions, each of variance f^2 / (H W) (9 of 3072 dimensions, each
1/256 of a pixel's variance, for shapes), so the start stays Gaussian on the rest of the space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condiff.errors import ConfigError


def centre_subpixel_means(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x (B, C, H, W) with the spatial means of its ``factor`` x ``factor`` sub-pixel phases made equal, per image
    and channel (their common value is the channel's mean, which is kept). ``factor`` 1 returns x."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"centre_subpixel_means: factor must be a positive integer, got {factor!r}")
    if factor == 1:
        return x
    if x.dim() != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ConfigError(
            f"centre_subpixel_means: x must be (B, C, H, W) with H and W divisible by {factor}, "
            f"got shape {tuple(x.shape)}"
        )
    b, c, h, w = x.shape
    u = F.pixel_unshuffle(x, factor).reshape(b, c, factor * factor, h // factor, w // factor)
    phase_means = u.mean(dim=(3, 4), keepdim=True)
    u = u - phase_means + phase_means.mean(dim=2, keepdim=True)
    return F.pixel_shuffle(u.reshape(b, c * factor * factor, h // factor, w // factor), factor)
