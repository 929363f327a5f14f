"""Guidance rescale (Lin, Liu, Li, Yang, WACV 2024, "Common diffusion noise schedules and sample steps are
flawed", sec. 3.4, eqs. 15-18):

    y_cfg      = y_u + w (y_c - y_u)
    y_rescaled = y_cfg * std(y_c) / std(y_cfg)          (std per sample, over all non-batch entries)
    y_final    = phi * y_rescaled + (1 - phi) * y_cfg

where y is the prediction in a chosen space. The space matters (std is not preserved by the affine maps
between spaces at fixed x, t): ``space`` is a condiff Prediction object and defaults to ``X0()``, the
denoised estimate, condiff's canonical output. diffusers applies the rule to whatever the network predicts
(``rescale_noise_cfg`` on the eps or v output); pass ``space=Eps()`` or ``space=V()`` for that. The result
is converted back to x0. [UNVERIFIED: which space the paper's own experiments used (their model predicts v).]

phi = 0 is plain CFG, returned exactly (no round trip through the space); phi = 1 makes the per-sample std of
the guided prediction in ``space`` equal to that of the conditional prediction. The std uses Bessel's
correction, as torch and diffusers do; it cancels in the ratio.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from condiff.core import parameterization as P
from condiff.core.denoiser import X0, Prediction, Wrapper, coefficients
from condiff.errors import ConfigError
from condiff.guidance.cfg import contrast
from condiff.guidance.interval import branches, split_null
from condiff.guidance.schedules import check_scale, per_row, scale_at


def rescale_guidance(y_cfg: torch.Tensor, y_cond: torch.Tensor, phi: float, eps: float = 0.0) -> torch.Tensor:
    """Lin et al. eqs. 17-18 on tensors already in the chosen space; std per sample over all other dims.

    ``eps`` is added to std(y_cfg) (diffusers uses 1e-6; 0 keeps the identity exact)."""
    dims = tuple(range(1, y_cfg.dim()))
    ratio = y_cond.std(dim=dims, keepdim=True) / (y_cfg.std(dim=dims, keepdim=True) + eps)
    return phi * (y_cfg * ratio) + (1.0 - phi) * y_cfg


def to_space(space: Prediction, x, x0, t, schedule):
    """x0 -> the prediction ``space`` (its training target) at (x, t)."""
    a, s = coefficients(schedule, t, x)
    return space.target(x0, P.x0_to_eps(x, x0, a, s), a, s, t, schedule)


def from_space(space: Prediction, x, y, t, schedule):
    a, s = coefficients(schedule, t, x)
    return space.to_x0(y, x, a, s, t, schedule)


@dataclass
class GuidanceRescale(Wrapper):
    """CFG followed by guidance rescale with factor ``phi`` in [0, 1] in ``space`` (module docstring)."""

    denoiser: Any
    scale: float | Callable = 3.0
    phi: float = 0.7
    space: Prediction = field(default_factory=X0)
    null: Mapping[str, Any] | None = None

    def __post_init__(self):
        self.scale = check_scale(self.scale)
        p = self.phi
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"guidance rescale phi must be a number in [0, 1], got {p!r}")
        if not isinstance(self.space, Prediction):
            raise ConfigError(
                f"guidance rescale space must be a Prediction object (X0(), Eps(), V(), ...), got {self.space!r}"
            )

    def __call__(self, x, t, cond=None):
        cond, null = split_null(cond, self.null, what="guidance rescale")
        w = scale_at(self.scale, t)
        if isinstance(w, float) and w == 1.0:  # y_cfg = y_c: the rescale is the identity (as CFG, one branch)
            return self.denoiser(x, t, cond)
        x0_c, x0_u = branches(self.denoiser, x, t, cond, null)
        x0_cfg = contrast(x0_c, x0_u, per_row(w, x0_c))
        if self.phi == 0:
            return x0_cfg
        sch = self.denoiser.schedule
        y_c = to_space(self.space, x, x0_c, t, sch)
        y_cfg = to_space(self.space, x, x0_cfg, t, sch)
        return from_space(self.space, x, rescale_guidance(y_cfg, y_c, float(self.phi)), t, sch)
