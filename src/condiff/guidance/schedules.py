"""Guidance-scale schedules: the CFG weight as a function of t.

Every schedule here is a frozen object ``w(t)``: for a Python float t it returns a Python float, for a
per-sample tensor t (shape [n]) a float64 tensor of shape [n], so it can be given as ``scale`` to CFG and to
every guidance in this package (``CFG(D, LinearScale(5.0, 1.0, 1.0, 0.0))``). The convention is the
diffusers one: w = 1 is the conditional model, w = 0 the unconditional one.

- ``LinearScale``: w linear in t between (t_start, w_start) and (t_end, w_end), constant outside. The
  "linearly increasing" scheduler of Wang et al. 2024 ("Analysis of classifier-free guidance weight
  schedulers", TMLR), which grows the weight as sampling proceeds (t decreasing), is
  ``LinearScale(0.0, 2 w, t_max, 0.0)`` (mean w over the range).
- ``CosineScale``: the same two end points joined by a half cosine; with ``power`` p the position along the
  range is raised to p first, which gives the power-cosine schedule of Gao et al. 2023 ("Masked diffusion
  transformer", sec. 3.4) for ``CosineScale(1.0, w, t_max, 0.0, power=p)``.
- ``IntervalScale``: w inside the interval t_lo < t <= t_hi and ``outside`` (1: the conditional model)
  elsewhere: the guidance interval of Kynkäänniemi et al. 2024 ("Applying guidance in a limited interval
  improves sample and distribution quality in diffusion models", eq. 4, stated there for sigma in
  (sigma_lo, sigma_hi]; t is monotone in sigma for every schedule here, so the interval maps over).
  ``GuidanceInterval`` (interval.py) is the Denoiser that also skips the unconditional branch outside.

``scale_at`` and ``per_row`` are the two helpers every guidance here uses to read a scale (a number or any
callable t -> w) at t and to broadcast a per-sample weight against x.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Union

import torch

from condiff.errors import ConfigError, check_real

Scale = Union[float, Callable]
MAX_SCALE = 1e4  # the bound CFG uses (cfg.MAX_SCALE): beyond it guided estimates overflow float32


def check_scale(scale, what: str = "guidance scale"):
    """A scale is a finite number with |w| <= 1e4 or a callable t -> w; anything else is a ConfigError."""
    if callable(scale):
        return scale
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not abs(scale) <= MAX_SCALE:
        raise ConfigError(
            f"{what} must be a finite number with |scale| <= {MAX_SCALE:g} or a function of t, got {scale!r}"
        )
    return float(scale)


def scale_at(scale, t):
    """The weight at t: a Python float for a number or a scalar t; a float64 tensor [n] when a callable scale
    is read at a per-sample t (shape [n]). A callable is called with t as given."""
    if not callable(scale):
        return float(scale)
    per_sample = isinstance(t, torch.Tensor) and t.dim() == 1
    w = scale(t)
    if per_sample:
        return torch.as_tensor(w, dtype=torch.float64).expand(t.shape).to(t.device)
    return float(w)


def per_row(w, x: torch.Tensor):
    """``w`` ready to multiply x: a Python float unchanged, a per-sample tensor [n] reshaped to [n, 1, ...]."""
    if isinstance(w, torch.Tensor):
        return w.to(x.dtype).to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))
    return w


def _times(t):
    """t as a float64 tensor and whether it was a scalar (so the result goes back to a float)."""
    scalar = not (isinstance(t, torch.Tensor) and t.dim() > 0)
    return torch.as_tensor(t, dtype=torch.float64), scalar


def _out(w: torch.Tensor, scalar: bool):
    return float(w) if scalar else w


@dataclass(frozen=True)
class _TwoPoint:
    w_start: float
    w_end: float
    t_start: float
    t_end: float

    def __post_init__(self):
        check_real(f"{type(self).__name__} w_start", self.w_start, -MAX_SCALE, MAX_SCALE)
        check_real(f"{type(self).__name__} w_end", self.w_end, -MAX_SCALE, MAX_SCALE)
        check_real(f"{type(self).__name__} t_start", self.t_start, -math.inf, math.inf)
        check_real(f"{type(self).__name__} t_end", self.t_end, -math.inf, math.inf)
        if not self.t_start > self.t_end:
            raise ConfigError(
                f"{type(self).__name__} needs t_start > t_end (sampling runs from t_start down), "
                f"got t_start={self.t_start!r}, t_end={self.t_end!r}"
            )

    def _progress(self, t: torch.Tensor) -> torch.Tensor:
        """0 at t_start, 1 at t_end, linear in t, clamped to [0, 1]."""
        return ((self.t_start - t) / (self.t_start - self.t_end)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class LinearScale(_TwoPoint):
    """w(t) = w_start at t >= t_start, w_end at t <= t_end, linear in t in between."""

    def __call__(self, t):
        tt, scalar = _times(t)
        u = self._progress(tt)
        return _out(self.w_start + (self.w_end - self.w_start) * u, scalar)


@dataclass(frozen=True)
class CosineScale(_TwoPoint):
    """w(t) = w_end + (w_start - w_end) (1 + cos(pi u^power)) / 2 with u = (t_start - t) / (t_start - t_end)
    clamped to [0, 1]: w_start at t_start, w_end at t_end, flat at both ends (for power 1)."""

    power: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_real("CosineScale power", self.power, 1e-3, 1e3)

    def __call__(self, t):
        tt, scalar = _times(t)
        u = self._progress(tt) ** self.power
        return _out(self.w_end + (self.w_start - self.w_end) * 0.5 * (1.0 + torch.cos(math.pi * u)), scalar)


@dataclass(frozen=True)
class IntervalScale:
    """w(t) = ``scale`` for t_lo < t <= t_hi and ``outside`` (default 1: no guidance) elsewhere."""

    scale: float
    t_lo: float
    t_hi: float
    outside: float = 1.0

    def __post_init__(self):
        check_real("IntervalScale scale", self.scale, -MAX_SCALE, MAX_SCALE)
        check_real("IntervalScale outside", self.outside, -MAX_SCALE, MAX_SCALE)
        check_real("IntervalScale t_lo", self.t_lo, -math.inf, math.inf)
        check_real("IntervalScale t_hi", self.t_hi, -math.inf, math.inf)
        if not self.t_hi > self.t_lo:
            raise ConfigError(f"IntervalScale needs t_lo < t_hi, got t_lo={self.t_lo!r}, t_hi={self.t_hi!r}")

    def inside(self, t) -> torch.Tensor:
        tt, _ = _times(t)
        return (tt > self.t_lo) & (tt <= self.t_hi)

    def __call__(self, t):
        tt, scalar = _times(t)
        w = torch.where(
            self.inside(tt),
            torch.tensor(self.scale, dtype=torch.float64),
            torch.tensor(self.outside, dtype=torch.float64),
        )
        return _out(w, scalar)
