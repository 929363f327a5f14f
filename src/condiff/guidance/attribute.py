"""Classifier guidance on one attribute of a trained ``AttributeClassifier`` (the shapes classifiers), three
ways. Each returns a Denoiser -> Denoiser object; the target class of every row is ``cond['cg_target']`` (the
denoiser never sees it), so the guidance stacks on any CFG-family denoiser and conditions it on nothing.

- ``classifier_guidance`` with a noise-aware classifier p(y | x_t, t) (the packaged recipe ``shapes-noisy-classifier``):
  ADM classifier guidance (Dhariwal & Nichol 2021, Algorithm 2; eq. 14 of Song et al. 2021), via
  ``ClassifierGuidance``: x0 += (sigma^2 / alpha) s grad_x log p(y | x_t).
- ``classifier_guidance`` with a clean classifier (trained on clean renders only): the naive off-the-shelf
  baseline, the same formula with the classifier applied to x_t as if it were noise-aware. This is what EluCD
  and PPAP improve on.
- ``elucd_guidance``: the same clean classifier with EluCD's calibration (Ma et al., ICLR 2024, sec. 4;
  ``guidance.elucd``): Softplus(beta) smoothing, the classifier on the clipped predicted x0, temperature and
  margin (tau1, tau2 = kappa tau1) and the DDPM sine-bump schedule.

``AttributeLogits`` adapts the network: (x, t) -> that attribute's logits, with t converted to the
classifier's [0, 1] time (``condiff.core.schedules.unit_time``) for a noise-aware net and ignored otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from condiff.core.denoiser import Wrapper
from condiff.core.schedules import unit_time
from condiff.errors import ConfigError
from condiff.guidance.classifier import ClassifierGuidance, from_logits
from condiff.guidance.elucd import EluCD, softplus_smoothed

TARGET_KEY = "cg_target"


@dataclass
class AttributeLogits:
    """(x, t) -> net's logits for ``attribute`` (B, C); ``schedule`` maps the sampler's t to [0, 1] for a
    noise-aware net (a clean net ignores t)."""

    net: Any = field(repr=False)  # a module tree
    attribute: str
    schedule: Any = None

    def __post_init__(self):
        self.net.head(torch.zeros(1, sum(self.net.head_sizes)), self.attribute)  # names the attribute or errors
        if self.net.config.noise_aware and self.schedule is None:
            raise ConfigError("a noise-aware classifier needs the schedule its t refers to")

    def __call__(self, x, t=None):
        if self.net.config.noise_aware:
            u = (
                unit_time(torch.as_tensor(t, dtype=torch.float64), self.schedule.t_min, self.schedule.t_max)
                .to(x.device)
                .reshape(-1)
                .expand(x.shape[0])
            )
            return self.net.head(self.net(x, u), self.attribute)
        return self.net.head(self.net(x), self.attribute)


def _check_target(cond):
    if not cond or TARGET_KEY not in cond:
        raise ConfigError(f"classifier guidance needs the target class of every row in cond[{TARGET_KEY!r}]")


@dataclass
class Targeted(Wrapper):
    """Refuses a cond without targets (one clear line instead of a KeyError deep in the gradient)."""

    denoiser: Any

    def __call__(self, x, t, cond=None):
        _check_target(cond)
        return self.denoiser(x, t, cond)


def classifier_guidance(denoiser, net, attribute: str, scale):
    """ADM classifier guidance by ``net``'s ``attribute`` head: a noise-aware net reads t (the proper noisy
    classifier); a clean net ignores it, which is the naive off-the-shelf baseline (module docstring)."""
    logits = AttributeLogits(net, attribute, denoiser.schedule)
    return Targeted(ClassifierGuidance(denoiser, from_logits(logits, TARGET_KEY), scale, drop=(TARGET_KEY,)))


@dataclass(frozen=True)
class EluCDSettings:
    """EluCD's calibration (official DDPM defaults: beta 3, tau1 1, kappa 0.5, gamma 0.3; clip to [-1, 1])."""

    beta: float = 3.0
    tau1: float = 1.0
    kappa: float = 0.5
    gamma: float = 0.3


def elucd_guidance(denoiser, net, attribute: str, scale, grid, settings: EluCDSettings = EluCDSettings()):
    """The clean classifier with EluCD's calibration on a sampling grid (module docstring)."""
    if net.config.noise_aware:
        raise ConfigError(
            "EluCD calibrates an off-the-shelf clean classifier; this one is noise-aware: use noisy_classifier_guidance"
        )
    smooth = softplus_smoothed(net, settings.beta)
    logits = AttributeLogits(smooth, attribute)
    return Targeted(
        EluCD(
            denoiser,
            logits,
            grid,
            scale,
            tau1=settings.tau1,
            tau2=settings.tau1 * settings.kappa,
            gamma=settings.gamma,
            key=TARGET_KEY,
        )
    )
