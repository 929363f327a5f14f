"""Per-sample diffusion training objectives, built from three independent choices:

- the target (a Prediction: eps, x0, v or flow velocity; Ho et al. 2020, Salimans & Ho 2022),
- the time sampler (uniform in t; logit-normal in t, Esser et al. 2024 sec. 3.1; log-normal sigma,
  Karras et al. 2022 Table 1),
- the weighting, a function of log-SNR (constant; min-SNR-gamma, Hang et al. 2023 eq. 8, expressed
  relative to the eps target; EDM's lambda(sigma), Karras et al. 2022 Table 1, on the x0 error).

``diffusion_loss`` returns one loss per sample, so callers can reweight, mask or reduce as they like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from condiff.core.denoiser import Prediction, coefficients
from condiff.core.schedules import NoiseSchedule


@dataclass(frozen=True)
class UniformTime:
    """t ~ U(t_min, t_max) (continuous, also for VP-discrete)."""

    def sample(self, schedule: NoiseSchedule, n: int, generator=None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return schedule.t_min + u * (schedule.t_max - schedule.t_min)


@dataclass(frozen=True)
class LogitNormalTime:
    """t = t_min + (t_max - t_min) * sigmoid(m + s z)."""

    mean: float = 0.0
    std: float = 1.0

    def sample(self, schedule, n, generator=None):
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return schedule.t_min + torch.sigmoid(self.mean + self.std * z) * (schedule.t_max - schedule.t_min)


@dataclass(frozen=True)
class LogNormalSigma:
    """log(sigma/alpha) ~ N(P_mean, P_std^2), mapped back to t (EDM's training distribution)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def sample(self, schedule, n, generator=None):
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        log_snr = -2.0 * (self.p_mean + self.p_std * z)
        t = schedule.t_from_log_snr(log_snr)
        return t.clamp(schedule.t_min, schedule.t_max)


@dataclass(frozen=True)
class ConstantWeight:
    def __call__(self, log_snr: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(log_snr)


@dataclass(frozen=True)
class MinSNRWeight:
    """min(SNR, gamma) / SNR: min-SNR-gamma for an eps-target loss."""

    gamma: float = 5.0

    def __call__(self, log_snr):
        snr = torch.exp(log_snr)
        return torch.clamp(snr, max=self.gamma) / snr


@dataclass(frozen=True)
class EDMWeight:
    """EDM's lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2 on the x0 error ||D(x, sigma) - x0||^2 (Karras
    et al. 2022, Table 1 and eq. 8), sigma being sigma/alpha = exp(-log_snr / 2).

    It is an x0-space weighting (``space = "x0"``): diffusion_loss multiplies it by the prediction's
    x0_scale^2, so it means the same loss whatever the network predicts. With EDM preconditioning
    x0_scale = c_out and lambda c_out^2 = 1: the loss is the plain MSE on the F target (eq. 8)."""

    sigma_data: float = 0.5
    space = "x0"

    def __call__(self, log_snr):
        sigma2 = torch.exp(-log_snr)
        sd2 = self.sigma_data**2
        return (sigma2 + sd2) / (sigma2 * sd2)


TIME_SAMPLERS = {"uniform": UniformTime, "logit-normal": LogitNormalTime, "lognormal-sigma": LogNormalSigma}
WEIGHTINGS = {"constant": ConstantWeight, "min-snr": MinSNRWeight, "edm": EDMWeight}


def diffusion_loss(
    model_fn,
    x0: torch.Tensor,
    cond,
    t: torch.Tensor,
    eps: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction,
    weighting=ConstantWeight(),
) -> torch.Tensor:
    """Per-sample weighted MSE between the network output and the prediction's target.

    The network is called as ``model_fn(x_in, t_in, cond)`` with (x_in, t_in) = prediction.precondition(x_t,
    t, ...), which is (x_t, t) except for EDM preconditioning (c_in x_t, c_noise). ``eps`` is the noise in
    x_t = alpha x0 + sigma eps: Gaussian, or PFGM++ kernel noise (condiff.solvers.pfgmpp). A weighting with
    ``space = "x0"`` (EDMWeight) weights the x0 error and is converted by the prediction's x0_scale^2."""
    a, s = coefficients(schedule, t, x0)
    x_t = a * x0 + s * eps
    target = prediction.target(x0, eps, a, s, t, schedule)
    x_in, t_in = prediction.precondition(x_t, t, a, s, schedule)
    out = model_fn(x_in, t_in, cond)
    per_sample = (out - target).pow(2).flatten(1).mean(1)
    w = weighting(schedule.log_snr(t)).to(per_sample.dtype)
    if getattr(weighting, "space", "target") == "x0":
        w = w * prediction.x0_scale(a, s, t, schedule).reshape(-1).to(per_sample.dtype).square()
    if not math.isfinite(float(w.sum())):
        raise FloatingPointError("weighting produced non-finite values")
    return w * per_sample
