"""Guidance in a limited interval (Kynkäänniemi, Aittala, Karras, Laine, Aila, Lehtinen, NeurIPS 2024,
"Applying guidance in a limited interval improves sample and distribution quality in diffusion models", eq. 4):

    x0_guided(x, t) = contrast(x0_cond, x0_uncond, w)   if t_lo < t <= t_hi
                    = x0_cond                            otherwise (w = 1, one half-size forward)

The paper states the interval in sigma, (sigma_lo, sigma_hi]; t is monotone in sigma for every schedule in
condiff, so give the t-interval (``schedule.t_for_sigma_ratio`` and friends convert). Inside the interval the
result is exactly ``CFG(denoiser, scale)`` (same batched call, same arithmetic); outside it is exactly the
conditional model. With a per-sample t (a tensor [n]) the unconditional branch is evaluated only for the rows
inside the interval.

This module also holds the two helpers the CFG family shares: ``split_null`` (take the null condition out of
a cond mapping) and ``branches`` (one batched forward of the null branch on a subset of rows and the
conditional branch on all rows, layout [null rows, cond], the library's [uncond, cond] convention).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from condiff.core.denoiser import Wrapper, check_cond_rows, take_rows
from condiff.errors import ConfigError
from condiff.guidance.cfg import CFG, NAMES, batch_cond, contrast
from condiff.guidance.schedules import check_scale, per_row, scale_at


def split_null(
    cond: Mapping[str, Any] | None, default: Mapping[str, Any] | None, key: str = "null", what: str = "guidance"
):
    """(cond without ``key``, the null condition): ``cond[key]`` or else ``default``; neither is an error."""
    cond = dict(cond or {})
    null = cond.pop(key, None) or default
    if null is None:
        raise ConfigError(f"{what} needs a {key} condition: pass cond[{key!r}] or give it at construction")
    return cond, null


def branches(
    denoiser, x: torch.Tensor, t, cond: Mapping[str, Any], null: Mapping[str, Any], rows: torch.Tensor | None = None
):
    """(x0_cond for all n rows, x0_null for the rows in the boolean mask ``rows``; all rows when None).

    One forward of batch n + len(rows), layout [null rows, cond]. With ``rows=None`` the call is exactly the
    one ``CFG`` makes, so results agree with it bit for bit; with no row selected only the conditional branch
    runs (batch n)."""
    n = x.shape[0]
    tt = torch.as_tensor(t)
    if rows is not None and bool(rows.all()):
        rows = None
    if rows is None:
        t2 = torch.cat([tt, tt]) if tt.dim() == 1 else t
        both = denoiser(torch.cat([x, x]), t2, batch_cond([dict(null), cond], n, NAMES))
        x0_u, x0_c = both.chunk(2, 0)
        return x0_c, x0_u
    check_cond_rows(cond, n)
    check_cond_rows(null, n, NAMES[0])  # before take_rows picks the null's rows
    index = rows.nonzero().squeeze(1)
    k = index.numel()
    if k == 0:
        return denoiser(x, t, cond), x[:0]
    t2 = torch.cat([tt[index.to(tt.device)], tt]) if tt.dim() == 1 else t
    out = denoiser(torch.cat([x[index], x]), t2, batch_cond([take_rows(dict(null), index, n), cond], (k, n), NAMES))
    return out[k:], out[:k]


@dataclass
class GuidanceInterval(Wrapper):
    """CFG with weight ``scale`` (a number or a function of t) inside t_lo < t <= t_hi; the conditional
    model elsewhere. ``null`` as in CFG (or ``cond['null']``)."""

    denoiser: Any
    scale: float | Callable = 3.0
    t_lo: float = 0.0
    t_hi: float = math.inf
    null: Mapping[str, Any] | None = None
    _cfg: CFG = field(init=False, repr=False)

    def __post_init__(self):
        self.scale = check_scale(self.scale)
        for name in ("t_lo", "t_hi"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or math.isnan(v):
                raise ConfigError(f"guidance interval {name} must be a number (inf allowed), got {v!r}")
        if not self.t_hi > self.t_lo:
            raise ConfigError(f"guidance interval needs t_lo < t_hi, got t_lo={self.t_lo!r}, t_hi={self.t_hi!r}")
        self._cfg = CFG(self.denoiser, self.scale, self.null)

    def inside(self, t) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=torch.float64)
        return (tt > self.t_lo) & (tt <= self.t_hi)

    def __call__(self, x, t, cond=None):
        per_sample = isinstance(t, torch.Tensor) and t.dim() == 1
        if not per_sample:
            if bool(self.inside(t)):
                return self._cfg(x, t, cond)
            return self.denoiser(x, t, split_null(cond, self.null, what="guidance interval")[0])
        cond, null = split_null(cond, self.null, what="guidance interval")
        rows = self.inside(t).to(x.device)
        x0_c, x0_u = branches(self.denoiser, x, t, cond, null, rows)
        if x0_u.shape[0] == 0:
            return x0_c
        index = rows.nonzero().squeeze(1)
        w = scale_at(self.scale, t)
        w_rows = w[index.to(w.device)] if isinstance(w, torch.Tensor) else w
        out = x0_c.clone()
        out[index] = contrast(x0_c[index], x0_u, per_row(w_rows, x0_u))
        return out
