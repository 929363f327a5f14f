"""SDEdit (Meng et al., ICLR 2022, sec. 3): perturb the image to an intermediate time with fresh noise,
x_{t0} = alpha_{t0} x0 + sigma_{t0} eps, then sample from there with the target condition. ``strength`` is
the share of the sampler's steps that are run (t0 = grid[N - round(strength N)]): 1 is generation from
scratch, small values stay close to the input. It needs no inversion: the baseline of the editing table."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from condiff.core.sampling import Gaussian, SampleOutput, sample
from condiff.errors import ConfigError
from condiff.inversion.ddim import check_grid


def start_index(steps: int, strength: float) -> int:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ConfigError(f"SDEdit strength must be a number in (0, 1], got {strength!r}")
    return steps - max(1, int(math.floor(strength * steps + 0.5)))


def sdedit(
    denoiser,
    solver,
    grid,
    x0: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    strength: float = 0.9,
    generator: torch.Generator | None = None,
    progress: bool | str = False,
) -> SampleOutput:
    grid = check_grid(grid)
    k = start_index(grid.numel() - 1, strength)
    t0 = torch.tensor(float(grid[k]), dtype=torch.float64)
    a, s = float(denoiser.schedule.alpha(t0)), float(denoiser.schedule.sigma(t0))
    x = a * x0 + s * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return sample(denoiser, solver, grid[k:], x, cond, Gaussian(generator), progress=progress)
