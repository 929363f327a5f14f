"""The toy conditional eps-network of the inversion oracles (specs/training_discrete_tasks.md sec. 0),
served by the ``toy`` fixture of conftest.py.

eps_theta(z, t, c): z in R^16, a sinusoidal embedding of the timestep t, a condition c in R^8, one tanh
hidden layer of 64 units, weights drawn from a fixed seed (1/sqrt(fan_in) scaling, so the output is O(1)).
It is *arbitrary*: no training, no relation to any data, which is what the "exact for any model" oracles
want. It runs on the SD-1.x schedule (scaled-linear betas 0.00085..0.012, T = 1000) as a VP-discrete
schedule, behind ``condiff.core.denoiser.wrap`` (eps prediction). Conditions are ``{"c": (B, 8)}`` with the null
condition ``{"c": zeros}`` under "null", as ``LoadedModel.condition`` returns them. ``x_gain`` scales the
weights that read z (1: the raw draw) and ``cond(scale=...)`` the condition.

Null-text inversion's defaults (10 Adam steps at lr 1e-2, thresholds 1e-5 + i 2e-5) are calibrated to SD,
whose null embedding has ~59k entries. Here the null is 8 numbers, and the null that makes the guided step
land on the pivot is about c itself, so NTI can only track the pivot when |c| is a few Adam steps (~0.02)
and the pivot is accurate (mild z-dependence, x_gain = 0.05). ``NTI_X_GAIN`` and ``NTI_COND_SCALE`` are that
setting; with the raw toy (1, 1) NTI meets its threshold in 0% of steps.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from condiff.core.denoiser import wrap
from condiff.core.schedules import VPDiscrete

DIM, COND_DIM, HIDDEN, FREQS = 16, 8, 64, 8
NTI_X_GAIN, NTI_COND_SCALE = 0.05, 0.02


def sd_schedule() -> VPDiscrete:
    return VPDiscrete.from_betas("scaled_linear", 1000, 0.00085, 0.012)


class ToyEps(nn.Module):
    """A fixed random MLP eps(z, t, c) (see the module docstring)."""

    def __init__(self, seed: int = 0, dtype=torch.float32, x_gain: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        fan_in = DIM + 2 * FREQS + COND_DIM

        def draw(*shape, fan):
            return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64).div(math.sqrt(fan)).to(dtype))

        self.w1, self.b1 = draw(fan_in, HIDDEN, fan=fan_in), draw(HIDDEN, fan=1.0)
        with torch.no_grad():
            self.w1[:DIM] *= x_gain
        self.w2, self.b2 = draw(HIDDEN, DIM, fan=HIDDEN), draw(DIM, fan=4.0)
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(FREQS, dtype=dtype) / FREQS))

    def forward(self, x, t, c):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        emb = torch.cat([torch.sin(t * self.freqs), torch.cos(t * self.freqs)], 1)
        h = torch.tanh(torch.cat([x, emb, c], 1) @ self.w1 + self.b1)
        return h @ self.w2 + self.b2


@dataclass
class Toy:
    """The toy model at one dtype: ``denoiser`` (unguided, reads cond['c']), data and conditions."""

    dtype: torch.dtype
    x_gain: float = 1.0

    def __post_init__(self):
        self.schedule = sd_schedule()
        self.net = ToyEps(0, self.dtype, self.x_gain).requires_grad_(False)
        self.denoiser = wrap(self.net, self.schedule, "eps")

    def x0(self, batch: int = 4, seed: int = 1) -> torch.Tensor:
        return torch.randn(batch, DIM, generator=torch.Generator().manual_seed(seed), dtype=self.dtype)

    def cond(self, batch: int = 4, seed: int = 2, scale: float = 1.0) -> dict:
        c = scale * torch.randn(batch, COND_DIM, generator=torch.Generator().manual_seed(seed), dtype=self.dtype)
        return {"c": c, "null": {"c": torch.zeros(batch, COND_DIM, dtype=self.dtype)}}
