"""The sinusoid oracle of TSDiff (Kollovieh et al., NeurIPS 2023; spec D2(d)): windows of a seasonal series whose
law is exactly Gaussian, so the denoiser and the forecast distribution are closed form, in float64.

A window of length L is

    x_tau = a sin(2 pi tau / P) + b cos(2 pi tau / P) + c + s xi_tau,      a, b, c, xi_tau ~ N(0, 1),

that is ``x = A u + s xi`` with the fixed basis A = [sin, cos, 1] (L x 3) and u ~ N(0, I_3), so

    x ~ N(0, Sigma),   Sigma = A A^T + s^2 I.

Under ``x_t = alpha x_0 + sigma eps`` (any condiff schedule) Gaussian conditioning (Tweedie) gives

    E[x_0 | x_t] = alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} x_t = U diag(alpha l / (alpha^2 l + sigma^2)) U^T x_t

with Sigma = U diag(l) U^T diagonalised once. The future given the observed past (the first C positions) is

    x_f | x_c ~ N(Sigma_fc Sigma_cc^{-1} x_c,  Sigma_ff - Sigma_fc Sigma_cc^{-1} Sigma_cf),

so the CRPS of the exact conditional forecast is known in closed form (``condiff.evaluation.crps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from condiff.core.denoiser import coefficients
from condiff.errors import ConfigError, check_int, check_real

Tensor = torch.Tensor
F64 = torch.float64


@dataclass(frozen=True, eq=False)
class SinusoidGP:
    """The Gaussian law of windows of ``length`` points with period ``period`` and observation noise ``noise``
    (module docstring). ``basis`` is A (L, 3), ``cov`` is Sigma (L, L)."""

    length: int = 96
    period: float = 24.0
    noise: float = 0.1
    basis: Tensor = field(init=False, repr=False)
    cov: Tensor = field(init=False, repr=False)
    evals: Tensor = field(init=False, repr=False)
    evecs: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        check_int("sinusoid window length", self.length, lo=2)
        check_real("sinusoid period", self.period, lo=0.0, lo_open=True)
        check_real("sinusoid noise", self.noise, lo=0.0, lo_open=True)
        tau = torch.arange(self.length, dtype=F64)
        w = 2 * math.pi * tau / self.period
        A = torch.stack([torch.sin(w), torch.cos(w), torch.ones_like(w)], dim=1)
        cov = A @ A.T + self.noise**2 * torch.eye(self.length, dtype=F64)
        evals, evecs = torch.linalg.eigh(cov)
        object.__setattr__(self, "basis", A)
        object.__setattr__(self, "cov", cov)
        object.__setattr__(self, "evals", evals)
        object.__setattr__(self, "evecs", evecs)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` windows (n, L) in float64."""
        n = check_int("number of windows", n, lo=1)
        u = torch.randn(n, 3, generator=generator, dtype=F64)
        xi = torch.randn(n, self.length, generator=generator, dtype=F64)
        return u @ self.basis.T + self.noise * xi

    def denoiser(self, schedule) -> "SinusoidDenoiser":
        """The exact denoiser E[x_0 | x_t] of this law under ``schedule``."""
        return SinusoidDenoiser(self, schedule)

    def _check_context(self, context_length: int) -> int:
        return check_int("context length", context_length, lo=1, hi=self.length - 1)

    def conditional(self, context: Tensor, context_length: int | None = None) -> tuple[Tensor, Tensor]:
        """The exact law of the future given the observed past: ``context`` (B, C) gives the means (B, L - C) and
        the shared covariance (L - C, L - C) of x_f | x_c (module docstring)."""
        context = torch.as_tensor(context, dtype=F64)
        if context.dim() != 2:
            raise ConfigError(f"context must be (batch, context length), got shape {tuple(context.shape)}")
        C = self._check_context(context.shape[1] if context_length is None else context_length)
        if context.shape[1] != C:
            raise ConfigError(f"context has {context.shape[1]} points but the context length is {C}")
        S = self.cov
        gain = torch.linalg.solve(S[:C, :C], S[:C, C:]).T  # Sigma_fc Sigma_cc^{-1}
        mean = context @ gain.T
        cov = S[C:, C:] - gain @ S[:C, C:]
        return mean, 0.5 * (cov + cov.T)

    def conditional_std(self, context_length: int) -> Tensor:
        """The per-position standard deviation (L - C,) of x_f | x_c (it does not depend on the context's values)."""
        C = self._check_context(context_length)
        _, cov = self.conditional(torch.zeros(1, C, dtype=F64))
        return cov.diagonal().clamp_min(0).sqrt()


@dataclass(frozen=True, eq=False)
class SinusoidDenoiser:
    """D(x_t, t) = E[x_0 | x_t] for the ``SinusoidGP`` law; x is (..., L), t a number or per-sample (B,).
    ``cond`` is ignored (the model is unconditional). Computed in float64, returned in x's dtype."""

    gp: SinusoidGP
    schedule: object

    def __call__(self, x: Tensor, t, cond=None) -> Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != self.gp.length:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ConfigError(f"the sinusoid denoiser needs a floating tensor (..., {self.gp.length}), got {shape}")
        a, s = coefficients(self.schedule, t, x.to(F64))
        a = a.reshape(a.shape + (1,) * (x.dim() - a.dim())) if a.dim() else a
        s = s.reshape(s.shape + (1,) * (x.dim() - s.dim())) if s.dim() else s
        U, l = self.gp.evecs, self.gp.evals
        z = x.to(F64) @ U  # coordinates in the eigenbasis
        gain = a * l / (a * a * l + s * s)
        return ((gain * z) @ U.T).to(x.dtype)

    def posterior_cov(self, t) -> Tensor:
        """Cov[x_0 | x_t] = Sigma - alpha^2 Sigma (alpha^2 Sigma + sigma^2 I)^{-1} Sigma (L, L) at one time t."""
        a, s = coefficients(self.schedule, t, torch.zeros((), dtype=F64))
        U, l = self.gp.evecs, self.gp.evals
        return (U * (l * s * s / (a * a * l + s * s))) @ U.T
