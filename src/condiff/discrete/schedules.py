"""Mask schedules for absorbing diffusion: each token is independently replaced by [M] with probability m(t).

- ``LogLinear``: SEDD/RADD's log-linear noise, sigma_bar(t) = -log(1 - (1-eps) t), so m(t) = 1 - exp(-sigma_bar(t))
  = (1-eps) t (Lou et al. 2024, Sec. 3.3; Ou et al., "Your Absorbing Discrete Diffusion Secretly Models the
  Conditional Distributions of Clean Data", ICLR 2025, Sec. 3).
- ``Linear``: MDLM's alpha_t = 1 - t, so m(t) = t (Sahoo et al., NeurIPS 2024, Eq. 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class MaskSchedule:
    """m(t) in [0, 1] for t in [0, 1], with sigma_bar(t) = -log(1 - m(t)) and its derivative."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-self.mask_prob(t))

    def dsigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class LogLinear(MaskSchedule):
    eps: float = 1e-3

    def mask_prob(self, t):
        return (1 - self.eps) * torch.as_tensor(t, dtype=torch.float64)

    def sigma_bar(self, t):
        return -torch.log1p(-(1 - self.eps) * torch.as_tensor(t, dtype=torch.float64))

    def dsigma_bar(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * torch.as_tensor(t, dtype=torch.float64))


@dataclass(frozen=True)
class Linear(MaskSchedule):
    def mask_prob(self, t):
        return torch.as_tensor(t, dtype=torch.float64).clone()

    def dsigma_bar(self, t):
        return 1 / (1 - torch.as_tensor(t, dtype=torch.float64))


def unmask_fraction(schedule: MaskSchedule, t: float, s: float) -> float:
    """(m(t) - m(s)) / m(t): the probability that a token masked at t is unmasked by s < t (Tweedie tau-leaping)."""
    mt, ms = float(schedule.mask_prob(_f64(t))), float(schedule.mask_prob(_f64(s)))
    return 1.0 if mt <= 0 else (mt - ms) / mt


def euler_fraction(schedule: MaskSchedule, t: float, s: float) -> float:
    """The Euler rate step: (t - s) sigma_bar'(t) exp(-sigma_bar) / (1 - exp(-sigma_bar)), capped at 1."""
    sb = float(schedule.sigma_bar(_f64(t)))
    rate = float(schedule.dsigma_bar(_f64(t))) * math.exp(-sb) / -math.expm1(-sb)
    return min(1.0, (t - s) * rate)


def _f64(t: float) -> torch.Tensor:
    return torch.tensor(t, dtype=torch.float64)
