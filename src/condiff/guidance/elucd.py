"""EluCD: guidance by an off-the-shelf *clean* classifier, calibrated (Ma, Wang, Chen, Sun, Li, Zhang,
"Elucidating the Design Space of Classifier-Guided Diffusion Generation", ICLR 2024, sec. 4, whose "code-exact" notes
follow the official AlexMaOLS/EluCD scripts).

The pieces, each a pure function here:

1. Smoothing: every ReLU of the classifier becomes Softplus(beta) = log(1 + e^{beta z}) / beta
   (``softplus_smoothed``; |Softplus_beta - ReLU| <= log(2) / beta).
2. Input: the classifier reads the predicted clean image x0_hat(x_t) (clipped to [-1, 1] in the DDPM code), as
   a detached leaf; the gradient is taken w.r.t. x0_hat and used as the guidance direction for x_t, without
   the Jacobian d x0_hat / d x_t (``x0_gradient``).
3. Temperature and margin: J(x0) = tau1 z_y - log sum_k exp(tau2 z_k) (``calibrated_log_likelihood``); the
   DDPM code sets tau2 = tau1 * kappa ("margin temperature discount", default 0.5); tau1 = tau2 = 1 is the
   log-softmax, tau2 = 0 the raw logit tau1 z_y (the EDM code's default).
4. Schedule, DDPM ancestral step t -> t-1 (code): mean <- mean + (Sigma_t + max(gamma sin(pi t / T)
   Sigma_max, 0)) grad, Sigma_max the running max of the step variances so far, t the (respaced) step index,
   T the number of steps (``ddpm_guidance_variance``; the bump is 0 at both ends, largest mid-trajectory).
5. Schedule, EDM Heun (code): the classifier reads x_cur / max(RMS(x_cur), 1) (``edm_classifier_input``);
   the gradient, normalised per sample to unit RMS, times RMS(x_cur) w_i, is added to x_cur before the step
   (``edm_guidance_shift``), with w_i = max(w_max (N + 1 - i) / (N + 1), 1e-5) + gamma w_max sin(pi i / N),
   i = 0..N-1 (``edm_guidance_weight``).

``EluCD`` puts 1-4 behind the Denoiser protocol. On a sampling grid t_0 > ... > t_M it shifts x0_hat at
t_k by (V_k / c_k) s grad, where V_k = Sigma_k + max(gamma sin(pi u_k) Sigma_max,k, 0) and c_k = alpha_{k+1}
sigma_{t|s}^2 / sigma_t^2 is the weight of x0_hat in DDPM's posterior mean (solvers/ddpm.py), Sigma_k that
step's posterior variance and u_k = (M - 1 - k) / M the code's t / T. So under the ``ddpm`` solver the step
mean moves by exactly V_k s grad, as in the official DDPM script (which uses ADM's learned variance where
condiff's DDPM uses the posterior variance); other one-evaluation-per-step solvers get the same x0 shift.
The EDM variant perturbs x before the network call, which a Denoiser cannot express: 5 is given as functions.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from condiff.core.denoiser import Wrapper
from condiff.errors import ConfigError
from condiff.guidance.schedules import check_scale

EDM_MIN_WEIGHT = 1e-5  # the EDM script floors the linear part of w_i at this value


# ---- 1. smoothing ---------------------------------------------------------------------------------------


def softplus_smoothed(net: nn.Module, beta: float) -> nn.Module:
    """A deep copy of ``net`` with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)`` (functional
    relu calls inside forward methods cannot be reached and are left as they are)."""
    if not isinstance(beta, numbers.Real) or isinstance(beta, bool) or not 0 < beta < math.inf:
        raise ConfigError(f"softplus beta must be a positive finite number, got {beta!r}")
    if isinstance(net, nn.ReLU):
        return nn.Softplus(beta=float(beta))
    out = copy.deepcopy(net)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Softplus(beta=float(beta)))
    return out


# ---- 3. temperature and margin --------------------------------------------------------------------------


def calibrated_log_likelihood(
    logits: torch.Tensor, y: torch.Tensor, tau1: float = 1.0, tau2: float | None = None
) -> torch.Tensor:
    """J = tau1 z_y - logsumexp(tau2 z) per sample, (B,); tau2 defaults to tau1 (temperature-scaled
    log-softmax). The DDPM code's margin form is tau2 = tau1 * kappa."""
    tau2 = tau1 if tau2 is None else tau2
    y = torch.as_tensor(y, dtype=torch.long, device=logits.device).reshape(-1).expand(logits.shape[0])
    return tau1 * logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(tau2 * logits, dim=1)


# ---- 2. the classifier on the predicted clean image ------------------------------------------------------


def x0_gradient(
    classifier: Callable,
    x0: torch.Tensor,
    y,
    tau1: float = 1.0,
    tau2: float | None = None,
    clip: tuple[float, float] | None = (-1.0, 1.0),
) -> torch.Tensor:
    """dJ/dx0 at x0 (clipped to ``clip`` first, then a detached leaf): ``classifier(x0) -> logits (B, C)``."""
    with torch.enable_grad():
        leaf = (x0 if clip is None else x0.clamp(*clip)).detach().requires_grad_(True)
        j = calibrated_log_likelihood(classifier(leaf), y, tau1, tau2)
        (grad,) = torch.autograd.grad(j.sum(), leaf)
    return grad


# ---- 4./5. schedules -----------------------------------------------------------------------------------


def sine_bump(u) -> torch.Tensor:
    """max(sin(pi u), 0): 0 at u = 0 and u = 1, 1 at u = 1/2."""
    return torch.clamp(torch.sin(math.pi * torch.as_tensor(u, dtype=torch.float64)), min=0.0)


def ddpm_guidance_variance(variance, max_variance, step, num_steps: int, gamma: float = 0.3):
    """Sigma_t + max(gamma sin(pi t / T) Sigma_max, 0): the factor multiplying the guidance gradient in the
    DDPM mean shift, at step index t of T (official DDPM script)."""
    return torch.as_tensor(variance, dtype=torch.float64) + gamma * torch.as_tensor(
        max_variance, dtype=torch.float64
    ) * sine_bump(torch.as_tensor(step) / num_steps)


def edm_guidance_weight(i, num_steps: int, w_max: float = 0.004, gamma: float = 0.3):
    """w_i = max(w_max (N + 1 - i) / (N + 1), 1e-5) + gamma w_max sin(pi i / N), step i of N (official EDM
    script: a linear decay plus the sine bump)."""
    i = torch.as_tensor(i, dtype=torch.float64)
    linear = torch.clamp(w_max * (num_steps + 1 - i) / (num_steps + 1), min=EDM_MIN_WEIGHT)
    return linear + gamma * w_max * sine_bump(i / num_steps)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).flatten(1).mean(1).sqrt().reshape((-1,) + (1,) * (x.dim() - 1))


def edm_classifier_input(x: torch.Tensor) -> torch.Tensor:
    """x / max(RMS(x), 1) per sample: samples with RMS above 1 are rescaled to unit RMS."""
    return x / torch.clamp(_rms(x), min=1.0)


def edm_guidance_shift(x: torch.Tensor, grad: torch.Tensor, weight) -> torch.Tensor:
    """grad / RMS(grad) * RMS(x) * w per sample: the term the EDM script adds to x_cur before its step."""
    return grad / _rms(grad) * _rms(x) * torch.as_tensor(weight, dtype=x.dtype)


# ---- the Denoiser wrapper (DDPM schedule) ---------------------------------------------------------------


def ddpm_step_factors(schedule, grid: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid step k (t_k -> t_{k+1}): V_k = Sigma_k + max(gamma sin(pi u_k) max_{j<=k} Sigma_j, 0) with
    u_k = (M - 1 - k)/M, and c_k = alpha_{k+1} sigma_{t|s}^2 / sigma_t^2 (DDPM's posterior-mean weight on x0)."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    m = grid.numel() - 1
    a, s = schedule.alpha(grid), schedule.sigma(grid)
    a_t, s_t, a_s, s_s = a[:-1], s[:-1], a[1:], s[1:]
    var_ts = torch.clamp(s_t**2 - (a_t / a_s) ** 2 * s_s**2, min=0.0)
    variance = var_ts * s_s**2 / s_t**2
    running_max = torch.cummax(variance, 0).values
    u = (m - 1 - torch.arange(m, dtype=torch.float64)) / m
    v = ddpm_guidance_variance(variance, running_max, u * m, m, gamma)
    return v, a_s * var_ts / s_t**2


@dataclass
class EluCD(Wrapper):
    """Off-the-shelf clean-classifier guidance on a sampling grid (module docstring).

    ``classifier(x0) -> logits (B, C)`` (smooth it first with ``softplus_smoothed``); the target class is
    ``cond[key]``, removed from the cond the denoiser sees unless ``keep_label``. ``scale`` (s) is a number or
    a function of t. The denoiser must be called at grid times only (ddpm, ddim, dpmpp-2m, ...)."""

    denoiser: Any
    classifier: Callable = field(repr=False)  # a module tree
    grid: torch.Tensor = field(repr=False)
    scale: float | Callable = 1.0
    tau1: float = 1.0
    tau2: float | None = 0.5
    gamma: float = 0.3
    clip: tuple[float, float] | None = (-1.0, 1.0)
    key: str = "y"
    keep_label: bool = False
    _factor: dict = field(init=False, repr=False)

    def __post_init__(self):
        check_scale(self.scale)
        for name in ("tau1", "gamma") + (("tau2",) if self.tau2 is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"EluCD {name} must be a finite number >= 0, got {v!r}")
        grid = torch.as_tensor(self.grid, dtype=torch.float64)
        if grid.dim() != 1 or grid.numel() < 2 or not bool(torch.all(grid[1:] < grid[:-1])):
            raise ConfigError("EluCD grid must be a 1-D, strictly descending tensor with at least 2 points")
        v, c = ddpm_step_factors(self.schedule, grid, self.gamma)
        self._factor = {float(t): float(vk / ck) if ck > 0 else 0.0 for t, vk, ck in zip(grid[:-1], v, c)}

    def check_solver(self, solver, grid=None) -> None:
        """One ConfigError now, before any sampling, if ``solver`` on ``grid`` (default: EluCD's own) would call
        the denoiser off the grid: a dry run with a zero denoiser records the times it asks for."""
        from condiff.core.sampling import Gaussian, sample

        asked = []

        class Probe:
            schedule = self.schedule

            def __call__(self, x, t, cond=None):
                asked.append(t)
                return torch.zeros_like(x)

        grid = self.grid if grid is None else grid
        sample(
            Probe(),
            solver,
            grid,
            torch.zeros(1, 1, dtype=torch.float64),
            None,
            Gaussian(torch.Generator().manual_seed(0)),
            check_finite=False,
        )
        for t in asked:
            self.factor(t)

    def factor(self, t) -> float:
        """V_k / c_k at grid time t (the x0 shift per unit of s * grad)."""
        key = float(t) if not isinstance(t, torch.Tensor) or t.numel() == 1 else None
        if key is None or key not in self._factor:
            raise ConfigError(
                f"EluCD is defined at its grid times (one scalar t per call); got t={t!r}. Use a "
                f"solver with one evaluation per step (ddpm, ddim, dpmpp-2m)"
            )
        return self._factor[key]

    def __call__(self, x, t, cond=None):
        cond = dict(cond or {})
        if self.key not in cond:
            raise ConfigError(f"EluCD needs the target class in cond[{self.key!r}]")
        y = cond[self.key]
        inner = cond if self.keep_label else {k: v for k, v in cond.items() if k != self.key}
        x0 = self.denoiser(x, t, inner)
        s = self.scale(t) if callable(self.scale) else self.scale
        f = self.factor(t)
        if s == 0 or f == 0:
            return x0
        grad = x0_gradient(self.classifier, x0, y, self.tau1, self.tau2, self.clip)
        return x0 + (f * s) * grad.to(x0.dtype)
