"""Classifier guidance for absorbing diffusion as a LogitDenoiser -> LogitDenoiser transform.

Nisonoff et al. 2024 ("Unlocking Guidance for Discrete State-Space Diffusion and Flow Models", Eq. 7 and its
first-order approximation, Eq. 9) tilt each position's reverse transition by the classifier; CtrlDiff (Huang &
Tang 2025) applies the same tilt to the clean-token predictions of a masked diffusion model. For a masked
position i of x_t and a real token v,

    log c'[i, v] = log c[i, v] + gamma * Delta[i, v] - log Z_i,
    Delta[i, v]  = log p(y | x_t with position i set to v, the others unchanged),

renormalised over v. ``ExactTilt`` evaluates Delta with one classifier call per (masked position, token), all in
one batch; ``FirstOrder`` uses the Taylor step Delta[i, v] ~ g[i, v] - g[i, x_t^i], with g = d log p(y | x) /
d onehot(x) at the current x_t (one forward and one backward), exact when log p(y | x) is linear in the one-hots.
Unmasked positions are returned unchanged.

The tilt is per position: with the exact noisy classifier p(y | x_t) = E[p(y | x_0) | x_t] and gamma = 1, drawing
one position per step (``sample_ordered``) samples p(x | y) exactly; with several positions per step, another
classifier or gamma != 1 it only approximates p(x) p(y | x)^gamma.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from condiff.discrete.denoiser import LogitDenoiser, mask_id, one_hot
from condiff.errors import ConfigError, check_int, check_real

Classifier = Callable[[torch.Tensor], torch.Tensor]
"""Soft one-hots (B, L, V+1) -> log p(y | x) of the wanted class, shape (B,). The class is baked in, e.g.
``lambda h: net(h).log_softmax(-1)[:, y]``; a time-independent classifier of x_t sees the mask as token V."""


def classifier_log_prob(classifier: Classifier, h: torch.Tensor) -> torch.Tensor:
    """classifier(h), checked to return one value per row."""
    lp = classifier(h)
    if not isinstance(lp, torch.Tensor) or lp.shape != (h.shape[0],):
        shape = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
        raise ConfigError(f"a classifier must return log p(y | x) of shape ({h.shape[0]},), got {shape}")
    return lp


class TiltMode:
    """How Delta[b, i, v] (B, L, V) is computed; only the masked positions are read."""

    gamma: float

    def delta(self, classifier: Classifier, h: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor):
        raise NotImplementedError


@dataclass(frozen=True)
class ExactTilt(TiltMode):
    """Delta by enumeration: V classifier rows per masked position, in batches of at most ``batch_rows`` rows."""

    gamma: float = 1.0
    batch_rows: int = 4096

    def __post_init__(self):
        object.__setattr__(self, "gamma", check_real("guidance gamma", self.gamma))
        check_int("batch_rows", self.batch_rows, lo=1)

    def delta(self, classifier, h, tokens, masked):
        b, length, w = h.shape
        v = w - 1
        where = masked.nonzero()  # (K, 2): (row, position)
        out = torch.zeros(b, length, v, dtype=h.dtype)
        if not len(where):
            return out
        vals = torch.arange(v).repeat(len(where))  # token of each variant, K * V
        rows, pos = where[:, 0].repeat_interleave(v), where[:, 1].repeat_interleave(v)
        lps = []
        with torch.no_grad():
            for s in range(0, len(vals), self.batch_rows):
                r, p, t = rows[s : s + self.batch_rows], pos[s : s + self.batch_rows], vals[s : s + self.batch_rows]
                hv = h[r].clone()
                hv[torch.arange(len(r)), p] = torch.nn.functional.one_hot(t, w).to(h.dtype)
                lps.append(classifier_log_prob(classifier, hv))
        lp = torch.cat(lps)
        out = out.to(lp.dtype)
        out[where[:, 0], where[:, 1]] = lp.reshape(len(where), v)
        return out


@dataclass(frozen=True)
class FirstOrder(TiltMode):
    """Delta[i, v] ~ g[i, v] - g[i, x^i], g the gradient of log p(y | x) in the one-hots (one forward + backward)."""

    gamma: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "gamma", check_real("guidance gamma", self.gamma))

    def delta(self, classifier, h, tokens, masked):
        with torch.enable_grad():
            hg = h.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(classifier_log_prob(classifier, hg).sum(), hg)
        current = g.gather(-1, tokens.unsqueeze(-1))
        return (g - current)[..., : h.shape[-1] - 1]


class ClassifierGuided(LogitDenoiser):
    """c'(x_t) = c(x_t) tilted by p(y | .)^gamma at the masked positions (module docstring).

    ``classifier`` maps soft one-hots (B, L, V+1) in ``dtype`` (float ids are made one-hots of that dtype; a
    float input is passed as given) to log p(y | x) of the wanted class, shape (B,). ``mode`` is ``ExactTilt`` or
    ``FirstOrder``; gamma = 0 returns the base output without calling the classifier. ``cond`` goes to the
    denoiser only."""

    def __init__(self, denoiser, classifier: Classifier, mode: TiltMode, dtype: torch.dtype = torch.float32):
        if not isinstance(mode, TiltMode):
            raise ConfigError(f"mode must be ExactTilt(gamma) or FirstOrder(gamma), got {mode!r}")
        self.denoiser, self.classifier, self.mode, self.dtype = denoiser, classifier, mode, dtype
        self.vocab_size = denoiser.vocab_size

    def __call__(self, x, cond=None):
        base = self.denoiser(x, cond)
        if self.mode.gamma == 0:
            return base
        v = self.vocab_size
        h = x if x.is_floating_point() else one_hot(x, v).to(self.dtype)
        tokens = h.argmax(-1)
        masked = tokens == mask_id(v)
        if not masked.any():
            return base
        delta = self.mode.delta(self.classifier, h.detach(), tokens, masked).to(base.dtype)
        tilted = torch.log_softmax(base + self.mode.gamma * delta, -1)
        return torch.where(masked.unsqueeze(-1), tilted, base)
