"""The continuous ranked probability score (Gneiting & Raftery 2007, "Strictly Proper Scoring Rules, Prediction,
and Estimation", eqs. 20-21), the forecast metric of TSDiff (Kollovieh et al., NeurIPS 2023, sec. 5):

    CRPS(F, y) = E|X - y| - 1/2 E|X - X'|,        X, X' ~ F independent (energy form; lower is better).

For a Gaussian F = N(mu, sd^2), with z = (y - mu) / sd (Gneiting et al. 2005, eq. 5):

    CRPS = sd [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)],

and sd = 0 (a point mass) gives |y - mu|. From S samples the energy form is estimated with the pair term over all
S^2 ordered pairs (``fair=False``, the plug-in CRPS of the empirical law: a point mass scores |x - y|) or over the
S (S - 1) distinct pairs (``fair=True``, unbiased for CRPS(F, y)). E|X - X'| is computed from sorted samples in
O(S log S): sum_{i,j} |x_i - x_j| = 2 sum_i (2 i - S + 1) x_(i) (0-based order statistics).
"""

from __future__ import annotations

import math

import torch

from condiff.errors import ConfigError

Tensor = torch.Tensor


def crps_gaussian(mean, std, y) -> Tensor:
    """Elementwise CRPS of N(mean, std^2) at y (broadcast); std = 0 is the point mass, |y - mean|."""
    mean, std, y = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (mean, std, y)))
    if not bool(torch.all(torch.isfinite(std) & (std >= 0))):
        raise ConfigError("CRPS of a Gaussian needs finite standard deviations >= 0")
    safe = torch.where(std > 0, std, torch.ones_like(std))
    z = (y - mean) / safe
    normal = torch.distributions.Normal(0.0, 1.0)
    pdf = torch.exp(normal.log_prob(z))
    crps = safe * (z * (2 * normal.cdf(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    return torch.where(std > 0, crps, (y - mean).abs())


def crps_samples(samples, y, dim: int = 0, fair: bool = False) -> Tensor:
    """CRPS of the empirical law of ``samples`` (S along ``dim``) at ``y`` (broadcast against the other dims),
    by the energy form (module docstring); ``fair=True`` uses the S (S - 1) distinct pairs (needs S >= 2)."""
    x = torch.as_tensor(samples)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if x.dim() == 0:
        raise ConfigError("CRPS by samples needs a tensor with a sample dimension, got a 0-d tensor")
    x = x.movedim(dim, 0)
    S = x.shape[0]
    if S < 1 or (fair and S < 2):
        raise ConfigError(f"CRPS by samples needs at least {2 if fair else 1} samples, got {S}")
    y = torch.as_tensor(y, dtype=x.dtype)
    if not (bool(torch.all(torch.isfinite(x))) and bool(torch.all(torch.isfinite(y)))):
        raise ConfigError("CRPS by samples needs finite samples and observations")
    first = (x - y).abs().mean(0)
    xs = torch.sort(x, dim=0).values
    w = (2 * torch.arange(S, dtype=x.dtype) - S + 1).reshape((S,) + (1,) * (x.dim() - 1))
    pair_sum = 2 * (w * xs).sum(0)  # sum over all ordered pairs of |x_i - x_j|
    pairs = S * (S - 1) if fair else S * S
    return first - 0.5 * pair_sum / pairs
