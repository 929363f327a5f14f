"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", sec. 4,
Algorithms 1-2; Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 14), as a
Denoiser -> Denoiser object.

With a differentiable noisy classifier log p(y | x_t, t) and a scale s, the guided score is that of the
tempered posterior p_s(x_t | y) proportional to p_t(x_t) p(y | x_t)^s:

    score   = score_u + s grad_x log p(y | x_t)
    eps     = eps_u - sigma_t s grad_x log p(y | x_t)                (Dhariwal & Nichol, Algorithm 2)
    x0      = x0_u + (sigma_t^2 / alpha_t) s grad_x log p(y | x_t)   (x0 = (x - sigma eps) / alpha)

The three lines are the same statement (parameterization.py's conversions are linear in the score at fixed
x, t). s = 1 with the exact p(y | x_t) of the data gives the exact conditional score and the exact
conditional x0 = E[x_0 | x_t, y] (Bayes: log p_t(x | y) = log p_t(x) + log p(y | x_t) - log p(y)).

The gradient is taken at a detached copy of x (the guidance term carries no graph back to x, as in ADM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from condiff.core.denoiser import Wrapper, coefficients
from condiff.errors import ConfigError
from condiff.guidance.schedules import check_scale


def classifier_gradient(log_prob: Callable, x: torch.Tensor, t, cond) -> torch.Tensor:
    """grad_x sum_b log_prob(x, t, cond)[b] at a detached copy of x: each row's own gradient (B, ...)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lp = log_prob(xg, t, cond)
        if lp.shape != (x.shape[0],):
            raise ConfigError(
                f"a classifier's log_prob must return one value per sample, shape "
                f"({x.shape[0]},), got {tuple(lp.shape)}"
            )
        (grad,) = torch.autograd.grad(lp.sum(), xg)
    return grad


def from_logits(logits: Callable, key: str = "y") -> Callable:
    """log_prob(x, t, cond) = log_softmax(logits(x, t))[b, cond[key][b]] for a classifier network
    ``logits(x, t) -> (B, C)``."""

    def log_prob(x, t, cond):
        y = torch.as_tensor(cond[key], dtype=torch.long).reshape(-1).expand(x.shape[0])
        return torch.log_softmax(logits(x, t), dim=1).gather(1, y[:, None])[:, 0]

    return log_prob


def exact_gmm_classifier(gmm_denoiser, key: str = "y") -> Callable:
    """The exact noisy classifier of a GMM oracle, log p(y | x_t) = log sum_{k in y} r_k(x, t)
    (``GMMDenoiser.class_posterior``), as a log_prob for ``ClassifierGuidance``."""

    def log_prob(x, t, cond):
        y = torch.as_tensor(cond[key], dtype=torch.long).reshape(-1).expand(x.shape[0])
        return torch.log(gmm_denoiser.class_posterior(x, t).gather(1, y[:, None]))[:, 0]

    return log_prob


@dataclass
class ClassifierGuidance(Wrapper):
    """x0 = x0_u + (sigma^2 / alpha) s grad_x log p(y | x_t) (module docstring).

    ``log_prob(x, t, cond)`` returns log p(y | x_t) per sample (shape (B,)), reading its target from cond.
    The denoiser gets cond without the keys in ``drop`` (default 'y', the label: an unconditional model);
    pass ``drop=()`` to guide a conditional model. ``scale`` is a number or a function of t."""

    denoiser: Any
    log_prob: Callable
    scale: float | Callable = 1.0
    drop: Sequence[str] = ("y",)

    def __post_init__(self):
        check_scale(self.scale)
        if not callable(self.log_prob):
            raise ConfigError(f"classifier guidance needs a callable log_prob(x, t, cond), got {self.log_prob!r}")

    def __call__(self, x, t, cond=None):
        cond = dict(cond or {})
        inner = {k: v for k, v in cond.items() if k not in self.drop}
        x0 = self.denoiser(x, t, inner)
        s = self.scale(t) if callable(self.scale) else self.scale
        if s == 0:
            return x0
        a, sig = coefficients(self.schedule, t, x)
        grad = classifier_gradient(self.log_prob, x, t, cond)
        return x0 + (sig * sig / a) * s * grad.to(x0.dtype)
