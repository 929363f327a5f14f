"""Dynamic thresholding of the denoised estimate (Saharia et al. 2022, "Imagen", sec. 2.3; the DPM-Solver++
paper, Lu et al. 2022, sec. 5, uses it with data-prediction solvers).

At every evaluation, per sample: s = the ``ratio`` quantile of |x0_hat| over all its entries, raised to at
least 1 (and capped at ``max_value``); then x0_hat <- clamp(x0_hat, -s, s) / s. Samples whose quantile is <= 1
are only clipped to [-1, 1], so with ``max_value = 1`` this is static clipping. As a Denoiser -> Denoiser object
it gives every solver the option (diffusers has it as a flag on some schedulers), and it nests with CFG:
``DynamicThresholding(CFG(model.denoiser, 7.5))`` thresholds the guided estimate, as the paper does.

It is made for natural images, whose x0 overshoots in a few saturated pixels. On data with a large area at the
bound (the shapes model's black background, -1) the division by s > 1 lifts that area towards 0 at every step:
on shapes it turns the background grey at every scale and cuts accuracy at large ones (docs/guidance.md,
"Dynamic thresholding"; there ``max_value=1``, static clipping, is the setting that helps).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from condiff.core.denoiser import Wrapper
from condiff.errors import ConfigError


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = math.inf) -> torch.Tensor:
    """The thresholded x0 (same shape and dtype); the quantile is taken per sample over all other dims."""
    flat = x0.reshape(x0.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype).reshape(x0.shape)


@dataclass
class DynamicThresholding(Wrapper):
    """Wrap a Denoiser so that its x0 estimates are dynamically thresholded (module docstring)."""

    denoiser: Any
    ratio: float = 0.995
    max_value: float = math.inf

    def __post_init__(self):
        r, m = self.ratio, self.max_value
        if not isinstance(r, numbers.Real) or isinstance(r, bool) or not 0 < r <= 1:
            raise ConfigError(f"dynamic thresholding ratio must be a number in (0, 1], got {r!r}")
        if not isinstance(m, numbers.Real) or isinstance(m, bool) or not m >= 1:  # NaN fails too
            raise ConfigError(f"dynamic thresholding max_value must be a number >= 1, got {m!r}")

    def __call__(self, x, t, cond=None):
        return dynamic_threshold(self.denoiser(x, t, cond), self.ratio, self.max_value)
