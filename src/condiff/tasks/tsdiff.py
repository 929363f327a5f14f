"""TSDiff (Kollovieh et al., NeurIPS 2023, "Predict, Refine, Synthesize: Self-Guiding Diffusion Models for
Probabilistic Time Series Forecasting"): an unconditional denoiser over windows y = [context, horizon] (B, L) made
to forecast by observation self-guidance (sec. 3.1) and to refine a base forecast (sec. 3.2).

Observation self-guidance. With the observed positions under a mask m and the one-step Tweedie estimate
x0_hat(x_t) = D(x_t, t), the likelihood of the observations is approximated through x0_hat (paper sec. 3.1):

    log p(y_obs | x_t) ~ -E(x_t) + const,   E(x_t) = sum_{m = 1} l(x0_hat(x_t), y_obs) / std^k
    MSE:       l = (x0_hat - y)^2 / 2, k = 2   (a Gaussian likelihood N(y; x0_hat, std^2))
    quantile:  l = max(q e, (q - 1) e), e = y - x0_hat, k = 1   (asymmetric Laplace at level q)

and the guided score is score_u - scale grad_x E (sec. 3.1), i.e. in x0 (as condiff's classifier guidance):

    x0 = x0_u - (sigma_t^2 / alpha_t) scale grad_{x_t} E(x_t),

which is the paper's DDIM variant eps = eps_u + scale sigma_t grad E; every condiff solver runs it (DDPM included,
where the repo instead shifts the sample after the step). A constant weight with the MSE loss overshoots
at high noise (the Jacobian of x0_hat grows like alpha Sigma / sigma^2) and fades at low noise; ``AdaptedScale``
(a condiff choice, not the paper's) is the weight std^2 / (std^2 + sigma_t^2 / alpha_t^2), which makes the
likelihood's variance std^2 + (sigma_t / alpha_t)^2, the error of x0_hat added to the observation noise (as in
Pi-GDM's r_t^2, Song et al. 2023), and keeps every guided step a contraction towards the observations.
Sample k of S gets the quantile level q_k = k / (S + 1) (``quantile_levels``), which spreads the S samples across
the forecast's quantiles.

Refinement (sec. 3.2) treats the diffusion loss at one fixed tau as an energy (a -log p surrogate):

    E(y) = sum ||eps - eps_hat(alpha_tau y + sigma_tau eps, tau)||^2 + weight R(y),   eps ~ N(0, I) fresh each step,

with R the observation term above on x0_hat = y (MSE on the observed positions, or the quantile loss), and
either maximum likelihood, y <- y - lr grad E (``method="ml"``), or Langevin dynamics,
y <- y - lr grad E + sqrt(2 lr) noise xi (``method="langevin"``; the paper's noise is 0.1). TSDiff uses tau = 20 on
its 100-step table (linear beta from 1e-4 to 0.1), 20 steps and lr 0.1.

Gradients are taken at detached copies under ``torch.enable_grad`` inside these calls only; the guided x0 carries no
graph back to x (as condiff's classifier guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from condiff.core.denoiser import Wrapper, coefficients
from condiff.core.sampling import Gaussian, sample
from condiff.errors import ConfigError, check_int, check_real, one_of

Tensor = torch.Tensor
LOSSES = ("mse", "quantile")
REFINERS = ("ml", "langevin")


def quantile_levels(num_samples: int) -> Tensor:
    """q_k = k / (S + 1) for k = 1..S (float64): the quantile level of sample k under quantile guidance."""
    S = check_int("number of samples", num_samples, lo=1)
    return torch.arange(1, S + 1, dtype=torch.float64) / (S + 1)


def pinball(error: Tensor, q) -> Tensor:
    """The quantile (pinball) loss max(q e, (q - 1) e) of e = y - prediction, elementwise."""
    q = torch.as_tensor(q, dtype=error.dtype)
    return torch.maximum(q * error, (q - 1) * error)


def _check_loss(loss: str, quantiles) -> None:
    if loss not in LOSSES:
        raise one_of("observation loss", loss, LOSSES)
    if loss == "quantile":
        if quantiles is None:
            raise ConfigError("quantile guidance needs quantiles (one level in (0, 1) per sample)")
        q = torch.as_tensor(quantiles, dtype=torch.float64)
        if not bool(torch.all((q > 0) & (q < 1))):
            raise ConfigError("quantile levels must lie in (0, 1)")


def _rows(v, x: Tensor) -> Tensor:
    """A per-sample value (B,) or a scalar shaped to broadcast against x (B, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape((-1,) + (1,) * (x.dim() - 1)) if v.dim() == 1 else v


def observation_energy(x0: Tensor, observed: Tensor, mask: Tensor, loss: str = "mse", std: float = 1.0, quantiles=None):
    """E per sample (B,): sum over the observed positions of the MSE / 2 std^2 or the pinball loss / std at the
    per-sample ``quantiles`` (module docstring)."""
    observed = torch.as_tensor(observed, dtype=x0.dtype, device=x0.device)
    mask = torch.as_tensor(mask, dtype=x0.dtype, device=x0.device)
    err = observed - x0
    if loss == "mse":
        per = 0.5 * (err / std) ** 2
    else:
        per = pinball(err, _rows(quantiles, x0)) / std
    return (mask * per).reshape(x0.shape[0], -1).sum(1)


def _check_observation(observed, mask, std) -> None:
    if not torch.is_tensor(observed) or not torch.is_tensor(mask):
        raise ConfigError("observation guidance needs the observed values and their mask as tensors")
    if not bool(torch.all(torch.isfinite(observed))):
        raise ConfigError("observed values must be finite (put any number under mask = 0)")
    check_real("observation std", std, lo=0.0, lo_open=True)


@dataclass
class ObservationGuidance(Wrapper):
    """TSDiff's observation self-guidance (module docstring): x0 = x0_u - (sigma^2 / alpha) scale grad_x E.

    ``observed`` and ``mask`` broadcast against x (B, L) (mask 1 where observed); ``loss`` is 'mse' or 'quantile'
    (then ``quantiles`` holds one level per sample, e.g. ``quantile_levels(S)`` tiled); ``std`` is the likelihood's
    scale; ``scale`` the guidance weight (a number or a function of t)."""

    denoiser: Any
    observed: Tensor
    mask: Tensor
    scale: Any = 1.0
    loss: str = "mse"
    std: float = 1.0
    quantiles: Any = None

    def __post_init__(self):
        _check_loss(self.loss, self.quantiles)
        _check_observation(self.observed, self.mask, self.std)
        if not callable(self.scale):
            check_real("guidance scale", self.scale, lo=0.0)

    def __call__(self, x, t, cond=None):
        s = self.scale(t) if callable(self.scale) else self.scale
        if s == 0:
            return self.denoiser(x, t, cond)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = self.denoiser(xg, t, cond)
            energy = observation_energy(x0, self.observed, self.mask, self.loss, self.std, self.quantiles)
            (grad,) = torch.autograd.grad(energy.sum(), xg)
        a, sig = coefficients(self.schedule, t, x)
        return x0.detach() - (sig * sig / a) * s * grad.to(x0.dtype)


@dataclass(frozen=True)
class AdaptedScale:
    """The guidance weight ``weight`` std^2 / (std^2 + sigma_t^2 / alpha_t^2) as a function of t (module docstring):
    pass it as ``ObservationGuidance(scale=...)`` with the same ``std``."""

    schedule: Any
    std: float
    weight: float = 1.0

    def __post_init__(self):
        check_real("observation std", self.std, lo=0.0, lo_open=True)
        check_real("guidance weight", self.weight, lo=0.0)

    def __call__(self, t) -> float:
        a, s = coefficients(self.schedule, float(t), torch.zeros((), dtype=torch.float64))
        return self.weight * self.std**2 / (self.std**2 + float(s / a) ** 2)


def forecast_window(context: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """The window (B, C + H) holding ``context`` (B, C) and zeros in the horizon, and its observation mask."""
    if not torch.is_tensor(context) or context.dim() != 2 or not context.is_floating_point():
        raise ConfigError("context must be a floating tensor (batch, context length)")
    H = check_int("horizon", horizon, lo=1)
    B, C = context.shape
    window = torch.cat([context, context.new_zeros(B, H)], dim=1)
    mask = torch.cat([torch.ones(C, dtype=context.dtype), torch.zeros(H, dtype=context.dtype)])
    return window, mask


def self_guided_forecast(
    denoiser,
    context: Tensor,
    horizon: int,
    num_samples: int,
    solver,
    grid: Tensor,
    *,
    scale=1.0,
    loss: str = "mse",
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Forecast samples (S, B, H) of each series' horizon from its ``context`` (B, C) by observation self-guided
    sampling of the unconditional window ``denoiser`` (L = C + H) with ``solver`` over ``grid``. Under quantile
    guidance sample k gets the level k / (S + 1)."""
    S = check_int("number of samples", num_samples, lo=1)
    window, mask = forecast_window(context, horizon)
    B, L = window.shape
    observed = window.repeat_interleave(S, dim=0)  # rows: series-major, sample index fastest
    quantiles = quantile_levels(S).repeat(B) if loss == "quantile" else None
    guided = ObservationGuidance(denoiser, observed, mask, scale=scale, loss=loss, std=std, quantiles=quantiles)
    x = torch.randn(B * S, L, generator=generator, dtype=context.dtype)
    out = sample(guided, solver, grid, x, noise=Gaussian(generator)).x
    return out[:, -horizon:].reshape(B, S, horizon).transpose(0, 1)


def seasonal_naive(context: Tensor, horizon: int, period: int) -> Tensor:
    """The seasonal-naive forecast (B, H): the last ``period`` points of ``context`` (B, C) repeated."""
    if not torch.is_tensor(context) or context.dim() != 2:
        raise ConfigError("context must be a tensor (batch, context length)")
    H = check_int("horizon", horizon, lo=1)
    P = check_int("season period", period, lo=1, hi=context.shape[1])
    reps = math.ceil(H / P)
    return context[:, -P:].repeat(1, reps)[:, :H]


def diffusion_energy(denoiser, y: Tensor, tau, eps: Tensor) -> Tensor:
    """sum ||eps - eps_hat(alpha_tau y + sigma_tau eps, tau)||^2 per sample (B,) (paper sec. 3.2), with eps_hat from
    the denoiser's x0: eps_hat = (x_tau - alpha_tau x0_hat) / sigma_tau."""
    a, s = coefficients(denoiser.schedule, tau, y)
    x_t = a * y + s * eps
    eps_hat = (x_t - a * denoiser(x_t, tau, None)) / s
    return ((eps - eps_hat) ** 2).reshape(y.shape[0], -1).sum(1)


def refine(
    denoiser,
    init: Tensor,
    observed: Tensor,
    mask: Tensor,
    *,
    tau: float,
    method: str = "ml",
    steps: int = 20,
    lr: float = 0.1,
    weight: float = 1.0,
    loss: str = "mse",
    std: float = 1.0,
    quantiles=None,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Refine windows ``init`` (B, L) (a base forecast placed after the context) by ML or Langevin steps on
    E(y) = diffusion_energy(y, tau) + weight observation_energy(y) (module docstring). Returns the refined windows."""
    if method not in REFINERS:
        raise one_of("refinement method", method, REFINERS)
    _check_loss(loss, quantiles)
    _check_observation(observed, mask, std)
    if not torch.is_tensor(init) or not init.is_floating_point() or init.dim() < 2:
        raise ConfigError("refinement needs the initial windows as a floating tensor (batch, length)")
    steps = check_int("refinement steps", steps, lo=0)
    lr = check_real("refinement step size", lr, lo=0.0, lo_open=True)
    weight = check_real("observation weight", weight, lo=0.0)
    noise = check_real("Langevin noise", noise, lo=0.0)
    tau = check_real("refinement time tau", tau)
    a, s = coefficients(denoiser.schedule, tau, init)
    if not float(s) > 0:
        raise ConfigError(f"refinement time tau must have sigma > 0, got tau = {tau!r}")
    y = init.detach().clone()
    for _ in range(steps):
        eps = torch.randn(y.shape, generator=generator, dtype=y.dtype)
        with torch.enable_grad():
            yg = y.requires_grad_(True)
            energy = diffusion_energy(denoiser, yg, tau, eps)
            energy = energy + weight * observation_energy(yg, observed, mask, loss, std, quantiles)
            (grad,) = torch.autograd.grad(energy.sum(), yg)
        y = y.detach() - lr * grad
        if method == "langevin":
            y = y + math.sqrt(2 * lr) * noise * torch.randn(y.shape, generator=generator, dtype=y.dtype)
    return y.detach()
