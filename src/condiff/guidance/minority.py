"""Minority guidance (Um, Lee, Ye, ICLR 2024, "Don't Play Favorites: Minority Guidance for Diffusion Models",
arXiv 2301.12334).

1. Minority score (the paper's eq. 6, "Tweedie reconstruction loss"): for a clean sample x0 and one fixed
   perturbation time t,

       l(x0) = E_eps d(x0, x0_hat(alpha_t x0 + sigma_t eps, t)),      eps ~ N(0, I),

   estimated with ``n`` Monte-Carlo draws. x0_hat is Tweedie's E[x0 | x_t] (the denoiser). A sample the model
   reconstructs badly from a mild perturbation lies in a low-density region: large l = minority. The paper uses
   d = LPIPS(VGG); LPIPS needs pretrained VGG weights that cannot be fetched offline here, so condiff's default d
   is the squared error ||x0 - x0_hat||^2 (any callable d(a, b) -> (B,) can be passed).
2. Minority levels (sec. 3.2): L quantile bins of l over the training set, thresholds at the quantiles i/L
   (i = 1..L-1); label 0 = the most common samples, L-1 = the most minority.
3. Minority classifier p_psi(l | x_t): a noise-aware classifier over the L levels, trained with cross-entropy
   on x_t ~ q(x_t | x0), t uniform (as ADM's noisy classifier).
4. Guidance (eq. 8): grad log p~(x_t) = grad log p(x_t) + w grad_{x_t} log p_psi(l~ | x_t), i.e. classifier
   guidance (condiff.guidance.classifier) toward the target level l~ (default L-1) with scale w.

Defaults in the paper (LSUN-Bedrooms): t = 60 of 1000 steps, n = 5, L = 100, w = 3.5, l~ = L-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from condiff.core.denoiser import Wrapper, coefficients, take_rows
from condiff.core.schedules import unit_time
from condiff.errors import ConfigError
from condiff.guidance.classifier import ClassifierGuidance, from_logits
from condiff.guidance.schedules import check_scale

LEVEL_KEY = "minority_level"


def squared_error(x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """d(a, b) = ||a - b||^2 per sample, shape (B,)."""
    return (x0 - x0_hat).pow(2).flatten(1).sum(1)


def minority_score(
    denoiser,
    x0: torch.Tensor,
    t: float,
    n: int = 5,
    generator: torch.Generator | None = None,
    distance: Callable = squared_error,
    cond=None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """l(x0) = mean over ``n`` draws of d(x0, D(alpha_t x0 + sigma_t eps, t, cond)), shape (B,) (module doc, 1).

    Runs without gradients; eps is drawn from ``generator`` in x0's dtype, one (B, ...) batch per draw (so the
    result does not depend on ``batch_size``, which only bounds the rows per denoiser call; cond tensors with B
    rows are split with x0)."""
    if batch_size is not None and batch_size < x0.shape[0]:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        b = x0.shape[0]
        chunks = list(torch.split(torch.arange(b), batch_size))

        def chunked(x, tt, c):
            return torch.cat([denoiser(x[i], tt, take_rows(c, i, b)) for i in chunks])

        chunked.schedule = denoiser.schedule
        return minority_score(chunked, x0, t, n, generator, distance, cond)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"the minority score needs n >= 1 Monte-Carlo draws, got {n!r}")
    sch = denoiser.schedule
    if not (isinstance(t, (int, float)) and sch.t_min <= float(t) <= sch.t_max):
        raise ConfigError(f"the minority score's time t must be a number in [{sch.t_min}, {sch.t_max}], got {t!r}")
    a, s = coefficients(sch, float(t), x0)
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            x0_hat = denoiser(a * x0 + s * eps, float(t), cond)
            total += distance(x0, x0_hat).double()
    return total / n


def assign_levels(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Level of each score: l such that thresholds[l-1] <= score < thresholds[l] (0..L-1, L = len + 1)."""
    return torch.bucketize(scores.double(), thresholds.double(), right=True)


def quantile_levels(scores: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholds (L-1,), labels (B,)): thresholds at the quantiles i/L of ``scores``, labels 0 (most common)
    .. L-1 (most minority)."""
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise ConfigError(f"minority levels L must be an integer >= 2, got {levels!r}")
    scores = scores.double().reshape(-1)
    if scores.numel() < levels:
        raise ConfigError(f"{levels} minority levels need at least {levels} scores, got {scores.numel()}")
    thresholds = torch.quantile(scores, torch.arange(1, levels, dtype=torch.float64) / levels)
    return thresholds, assign_levels(scores, thresholds)


@dataclass
class MinorityClassifier:
    """A noise-aware level classifier with the score settings it was fitted with (``thresholds`` (L-1,), score
    time ``t``, ``n`` draws). Called as ``mc(x, t) -> (B, L)`` logits with the schedule's t; the net itself sees
    t mapped to [0, 1] over ``t_range`` (the schedule's (t_min, t_max); see ``unit_time``). ``info`` holds
    free-form metrics; ``model`` and ``weights`` (``condiff.core.fitted.weights_digest``) name the diffusion
    model whose scores it was fitted on (None: not recorded)."""

    net: Any = field(repr=False)  # a module tree
    thresholds: torch.Tensor
    t: float
    n: int = 5
    info: dict = field(default_factory=dict)
    t_range: tuple = (0.0, 1.0)
    model: str | None = None
    weights: str | None = None

    @property
    def levels(self) -> int:
        return int(self.thresholds.numel()) + 1

    def __call__(self, x, t):
        return self.net(x, unit_time(t, *self.t_range))

    def label(self, scores: torch.Tensor) -> torch.Tensor:
        return assign_levels(scores, self.thresholds)


@dataclass
class MinorityGuidance(Wrapper):
    """Classifier guidance toward minority level ``level`` (default L-1, the most minority) with scale w
    (module doc, 4): x0 = x0_u + (sigma^2 / alpha) w grad_x log p_psi(level | x_t). ``classifier`` is a
    MinorityClassifier (or any ``logits(x, t)`` with ``levels`` given). The denoiser gets cond unchanged."""

    denoiser: Any
    classifier: Any
    scale: float | Callable = 1.0
    level: int | None = None
    levels: int | None = None

    def __post_init__(self):
        check_scale(self.scale)
        if not callable(self.classifier):
            raise ConfigError(f"minority guidance needs a callable level classifier, got {self.classifier!r}")
        L = self.levels if self.levels is not None else getattr(self.classifier, "levels", None)
        if not isinstance(L, int) or L < 2:
            raise ConfigError(f"minority guidance needs the number of levels (>= 2), got {L!r}")
        level = L - 1 if self.level is None else self.level
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < L:
            raise ConfigError(f"minority level must be an integer in [0, {L - 1}], got {self.level!r}")
        self.level, self.levels = level, L
        target = from_logits(self.classifier, LEVEL_KEY)
        fixed = {LEVEL_KEY: level}
        self._guide = ClassifierGuidance(self.denoiser, lambda x, t, cond: target(x, t, fixed), self.scale, drop=())

    def __call__(self, x, t, cond=None):
        return self._guide(x, t, cond)
