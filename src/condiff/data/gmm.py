"""The Gaussian-mixture oracle: exact scores, denoisers, classifiers and PF-ODE solutions, in float64.

Data ``p_0 = sum_k pi_k N(mu_k, Sigma_k)`` in R^d; component k belongs to class ``c_k``. Under
``x_t = alpha x_0 + sigma eps`` every marginal is again a mixture:

    p_t(x | y) = sum_{k in y} pi_k N(x; alpha mu_k, C_k),      C_k = alpha^2 Sigma_k + sigma^2 I
    r_k(x)     = pi_k N(x; alpha mu_k, C_k) / p_t(x)            (responsibilities, via log-sum-exp)
    score      = -sum_k r_k C_k^{-1} (x - alpha mu_k),          eps* = -sigma score
    E[x_0|x_t] = sum_k r_k [mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k)]   (Tweedie / Gaussian conditioning)
    p(y | x_t) = sum_{k: c_k = y} r_k                           (exact noisy classifier; sigma = 0 gives p(y|x_0))

Each Sigma_k = U_k diag(l_k) U_k^T is diagonalised once, so C_k is diagonal in the basis U_k for every t.

Conditioning: a Denoiser made by ``GMM.denoiser(schedule)`` reads ``cond["y"]``, a LongTensor of class labels
(one per sample, or a scalar). ``NULL_CLASS = -1``, a missing ``"y"`` or ``cond=None`` mean "unconditional"
(all components), so the null condition of classifier-free guidance (Ho & Salimans 2022) is
``GMM.null_cond(batch)`` = ``{"y": full(batch, -1)}``, and ``CFG(gmm.denoiser(s), w)`` is exact CFG.

Reference PF-ODE (sec. 0.2): with lambda = log(alpha/sigma) and y = x/alpha the probability-flow ODE of any
schedule reads dy/dlambda = D(alpha y, t(lambda)) - y (Lu et al. 2022, DPM-Solver++ eq. 9 rearranged). Its
Jacobian has eigenvalues in (-1, 0] for a Gaussian, so fixed-step RK4 in lambda is accurate; check it by
halving the step. For one Gaussian the solution is closed form (sec. 14; Wang & Vastola 2023):

    x_t = alpha_t mu + C_t^{1/2} C_T^{-1/2} (x_T - alpha_T mu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from condiff.errors import ConfigError

Tensor = torch.Tensor
F64 = torch.float64
NULL_CLASS = -1


def _coef(v) -> Tensor:
    """alpha or sigma (float, 0-d or per-sample (B,)) shaped (B or 1, 1, 1) against (B, K, d)."""
    return torch.as_tensor(v, dtype=F64).reshape(-1, 1, 1)


@dataclass(frozen=True, eq=False)
class GMM:
    """A class-conditional Gaussian mixture. ``covs`` is (K, d, d) (full) or (K, d) (diagonal variances);
    ``classes`` (K,) gives each component's class (default: all class 0)."""

    means: Tensor
    covs: Tensor
    weights: Tensor
    classes: Tensor | None = None
    evals: Tensor = field(init=False, repr=False)
    evecs: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        means = torch.as_tensor(self.means, dtype=F64)
        k, d = means.shape
        covs = torch.as_tensor(self.covs, dtype=F64)
        covs = torch.diag_embed(covs) if covs.dim() == 2 else covs
        weights = torch.as_tensor(self.weights, dtype=F64)
        classes = (
            torch.zeros(k, dtype=torch.long)
            if self.classes is None
            else torch.as_tensor(self.classes, dtype=torch.long)
        )
        if covs.shape != (k, d, d) or weights.shape != (k,) or classes.shape != (k,):
            raise ConfigError(
                f"GMM shapes disagree: means {tuple(means.shape)}, covs {tuple(covs.shape)}, "
                f"weights {tuple(weights.shape)}, classes {tuple(classes.shape)}"
            )
        if not bool((weights > 0).all()) or bool((classes < 0).any()):
            raise ConfigError("GMM weights must be positive and classes non-negative")
        if not bool((torch.bincount(classes) > 0).all()):
            raise ConfigError(f"GMM classes must be 0..C-1, each with a component; got {classes.tolist()}")
        evals, evecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
        if not bool((evals > 0).all()):
            raise ConfigError("GMM covariances must be positive definite")
        for name, val in [
            ("means", means),
            ("covs", covs),
            ("weights", weights / weights.sum()),
            ("classes", classes),
            ("evals", evals),
            ("evecs", evecs),
        ]:
            object.__setattr__(self, name, val)

    @classmethod
    def gaussian(cls, mean, cov) -> "GMM":
        """A single Gaussian N(mean, cov) (one component, class 0)."""
        mean = torch.as_tensor(mean, dtype=F64)
        cov = torch.as_tensor(cov, dtype=F64)
        return cls(mean[None], cov[None], torch.ones(1, dtype=F64))

    @classmethod
    def random(
        cls,
        dim: int = 2,
        components: int = 4,
        num_classes: int = 2,
        seed: int = 0,
        spread: float = 2.0,
        var_range: tuple[float, float] = (0.05, 0.5),
    ) -> "GMM":
        """A seeded random mixture: means ~ N(0, spread^2), random rotations, variances log-uniform in
        ``var_range``, weights in [0.5, 1.5] (normalised), component k in class k % num_classes."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=g, dtype=F64)
        q, _ = torch.linalg.qr(torch.randn(components, dim, dim, generator=g, dtype=F64))
        lo, hi = math.log(var_range[0]), math.log(var_range[1])
        lam = torch.exp(lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=F64))
        covs = q @ torch.diag_embed(lam) @ q.transpose(1, 2)
        weights = 0.5 + torch.rand(components, generator=g, dtype=F64)
        return cls(means, covs, weights, torch.arange(components) % num_classes)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    @staticmethod
    def null_cond(batch: int) -> dict:
        """The unconditional ("null") condition for CFG: every label is NULL_CLASS."""
        return {"y": torch.full((batch,), NULL_CLASS, dtype=torch.long)}

    # ---- exact quantities at given alpha, sigma (floats or per-sample (B,) tensors) -------------------

    def log_weights(self, y: Tensor | None = None) -> Tensor:
        """log pi_k restricted to class y and renormalised: (B, K), or (1, K) when y is None.
        Entries with y == NULL_CLASS use every component."""
        logw = torch.log(self.weights)[None]
        if y is None:
            return logw
        y = torch.as_tensor(y, dtype=torch.long).reshape(-1)
        if bool(((y < NULL_CLASS) | (y >= self.num_classes)).any()):
            raise ConfigError(f"class labels must be in [-1, {self.num_classes - 1}], got {y.tolist()}")
        null = y[:, None] == NULL_CLASS
        keep = (self.classes[None] == y[:, None]) | null
        masked = torch.where(keep, logw, torch.tensor(-math.inf, dtype=F64))
        masked = masked - torch.logsumexp(masked, 1, keepdim=True)
        return torch.where(null, logw, masked)  # null rows: bit-identical to y=None

    def _whitened(self, x: Tensor, a, s):
        """z = U_k^T (x - a mu_k) (B, K, d) and the eigenvalues a^2 l_k + s^2 of C_k (B|1, K, d)."""
        a, s = _coef(a), _coef(s)
        diff = x.to(F64)[:, None, :] - a * self.means[None]
        z = torch.einsum("kij,bki->bkj", self.evecs, diff)
        return z, a * a * self.evals[None] + s * s

    def component_log_prob(self, x: Tensor, a, s) -> Tensor:
        """log N(x; a mu_k, C_k), shape (B, K)."""
        z, var = self._whitened(x, a, s)
        quad = (z * z / var).sum(-1)
        return -0.5 * (quad + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))

    def responsibilities(self, x: Tensor, a, s, y=None) -> Tensor:
        return torch.softmax(self.log_weights(y) + self.component_log_prob(x, a, s), dim=1)

    def log_prob(self, x: Tensor, a, s, y=None) -> Tensor:
        """log p_t(x | y), shape (B,)."""
        return torch.logsumexp(self.log_weights(y) + self.component_log_prob(x, a, s), dim=1)

    def score(self, x: Tensor, a, s, y=None) -> Tensor:
        z, var = self._whitened(x, a, s)
        r = self.responsibilities(x, a, s, y)
        per = torch.einsum("kij,bkj->bki", self.evecs, z / var)
        return -(r[..., None] * per).sum(1).to(x.dtype)

    def x0_mean(self, x: Tensor, a, s, y=None) -> Tensor:
        """E[x_0 | x_t = x, y]."""
        z, var = self._whitened(x, a, s)
        r = self.responsibilities(x, a, s, y)
        shrink = torch.einsum("kij,bkj->bki", self.evecs, self.evals[None] * z / var)
        per = self.means[None] + _coef(a) * shrink
        return (r[..., None] * per).sum(1).to(x.dtype)

    def eps(self, x: Tensor, a, s, y=None) -> Tensor:
        """E[eps | x_t = x, y] = -sigma * score (written without dividing by sigma)."""
        z, var = self._whitened(x, a, s)
        r = self.responsibilities(x, a, s, y)
        per = torch.einsum("kij,bkj->bki", self.evecs, z / var)
        return (_coef(s)[:, :, 0] * (r[..., None] * per).sum(1)).to(x.dtype)

    def class_posterior(self, x: Tensor, a, s) -> Tensor:
        """Exact p(y | x_t), shape (B, num_classes); with a = 1, s = 0 it is the clean p(y | x_0)."""
        r = self.responsibilities(x, a, s)
        out = torch.zeros(r.shape[0], self.num_classes, dtype=F64)
        return out.index_add(1, self.classes, r)

    def sample(self, n: int, generator: torch.Generator | None = None, y=None):
        """Draw n points from p_0 (or p_0(. | y)); returns (x (n, d) float64, labels (n,) long)."""
        probs = torch.exp(self.log_weights(None if y is None else torch.as_tensor(y).expand(n)))
        comp = torch.multinomial(probs.expand(n, -1), 1, replacement=True, generator=generator)[:, 0]
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        root = self.evecs * torch.sqrt(self.evals)[:, None, :]  # U diag(sqrt(l)): root root^T = Sigma
        x = self.means[comp] + torch.einsum("nij,nj->ni", root[comp], z)
        return x, self.classes[comp]

    def denoiser(self, schedule) -> "GMMDenoiser":
        return GMMDenoiser(self, schedule)


def _labels(cond: Mapping[str, Any] | None):
    if not cond or "y" not in cond or cond["y"] is None:
        return None
    return torch.as_tensor(cond["y"], dtype=torch.long)


@dataclass(frozen=True, eq=False)
class GMMDenoiser:
    """The exact denoiser E[x_0 | x_t, y] of a GMM under ``schedule`` (the Denoiser protocol).

    ``cond`` may hold ``"y"`` (see the module docstring); t is a float or a per-sample tensor."""

    gmm: GMM
    schedule: Any

    def _coefs(self, t):
        t = torch.as_tensor(t, dtype=F64)
        return self.schedule.alpha(t), self.schedule.sigma(t)

    def __call__(self, x, t, cond=None):
        return self.gmm.x0_mean(x, *self._coefs(t), _labels(cond))

    def eps(self, x, t, cond=None):
        return self.gmm.eps(x, *self._coefs(t), _labels(cond))

    def score(self, x, t, cond=None):
        return self.gmm.score(x, *self._coefs(t), _labels(cond))

    def log_prob(self, x, t, cond=None):
        return self.gmm.log_prob(x, *self._coefs(t), _labels(cond))

    def class_posterior(self, x, t):
        return self.gmm.class_posterior(x, *self._coefs(t))


def reference_pf_ode(denoiser, x: Tensor, t_from: float, t_to: float, cond=None, steps: int = 2048) -> Tensor:
    """Integrate the PF-ODE from t_from to t_to (both with sigma > 0) with ``steps`` RK4 steps uniform in
    lambda, on y = x/alpha: dy/dlambda = D(alpha y, t(lambda)) - y. Any Denoiser works (started once: one
    trajectory); use float64."""
    from condiff.core.denoiser import start_trajectory

    denoiser = start_trajectory(denoiser)
    sch = denoiser.schedule
    lam = torch.linspace(float(sch.half_log_snr(t_from)), float(sch.half_log_snr(t_to)), steps + 1, dtype=F64)

    def f(l, y):
        t = sch.t_from_log_snr(2.0 * l)
        return denoiser(sch.alpha(t) * y, float(t), cond) - y

    y = x / sch.alpha(t_from)
    for i in range(steps):
        l, h = lam[i], lam[i + 1] - lam[i]
        k1 = f(l, y)
        k2 = f(l + h / 2, y + h / 2 * k1)
        k3 = f(l + h / 2, y + h / 2 * k2)
        k4 = f(l + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return sch.alpha(t_to) * y


def gaussian_pf_ode(mean: Tensor, cov: Tensor, schedule, x: Tensor, t_from: float, t_to: float) -> Tensor:
    """Closed-form PF-ODE flow of N(mean, cov) data, in float64:
    x_t = alpha_t mu + U diag(sqrt((alpha_t^2 l + sigma_t^2) / (alpha_T^2 l + sigma_T^2))) U^T (x_T - alpha_T mu).
    The one implementation is ``condiff.solvers.analytic.GaussianFit.flow``."""
    from condiff.solvers.analytic import GaussianFit

    return GaussianFit.from_moments(mean, cov).flow(schedule, x.to(F64), t_from, t_to)
