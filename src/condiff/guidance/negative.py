"""Negative conditions, in two forms.

``NegativeGuidance``: the "negative prompt" of text-to-image pipelines. The null branch of classifier-free
guidance (Ho & Salimans 2022, eq. 6) is replaced by a negative condition c_neg:

    x0_guided = contrast(x0(x, t | c), x0(x, t | c_neg), w) = x0_neg + w (x0_c - x0_neg)

so the update points from c_neg towards c; it is exactly ``CFG`` with null := c_neg (same batched call,
layout [negative, cond]).

``Negation``: the conjunction-and-negation operator of composable diffusion (Liu, Li, Du, Torralba,
Tenenbaum, ECCV 2022, "Compositional visual generation with composable diffusion models", sec. 3), which
keeps the unconditional branch and subtracts the negative direction with its own weight:

    x0_guided = x0_u + w (x0_c - x0_u) - w_neg (x0_neg - x0_u)

one forward of layout [uncond, cond, negative]; w_neg = 0 is CFG. In score terms (x0 is affine in the score
at fixed x, t) this is score_u + w grad log p_t(c | x) - w_neg grad log p_t(c_neg | x).

Both read the negative condition from ``cond['negative']`` (a mapping with the same keys as the condition)
or from ``negative`` given at construction. x0 space = eps space for these affine mixes, as for CFG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from condiff.core.denoiser import Wrapper
from condiff.guidance.cfg import CFG, NAMES, batch_cond
from condiff.guidance.interval import split_null
from condiff.guidance.schedules import check_scale, per_row, scale_at


@dataclass
class NegativeGuidance(Wrapper):
    """CFG whose null branch is the negative condition (module docstring); ``scale`` a number or w(t)."""

    denoiser: Any
    scale: float | Callable = 3.0
    negative: Mapping[str, Any] | None = None
    _cfg: CFG = field(init=False, repr=False)

    def __post_init__(self):
        self.scale = check_scale(self.scale)
        self._cfg = CFG(self.denoiser, self.scale)

    def __call__(self, x, t, cond=None):
        cond, negative = split_null(cond, self.negative, key="negative", what="negative guidance")
        cond.pop("null", None)
        return self._cfg(x, t, {**cond, "null": negative})


@dataclass
class Negation(Wrapper):
    """x0_u + w (x0_c - x0_u) - w_neg (x0_neg - x0_u) in one forward [uncond, cond, negative]."""

    denoiser: Any
    scale: float | Callable = 3.0
    negative_scale: float | Callable = 1.0
    null: Mapping[str, Any] | None = None
    negative: Mapping[str, Any] | None = None

    def __post_init__(self):
        self.scale = check_scale(self.scale)
        self.negative_scale = check_scale(self.negative_scale, "negative guidance scale")

    def __call__(self, x, t, cond=None):
        cond, negative = split_null(cond, self.negative, key="negative", what="negation")
        cond, null = split_null(cond, self.null, what="negation")
        tt = torch.as_tensor(t)
        t3 = torch.cat([tt, tt, tt]) if tt.dim() == 1 else t
        conds = [dict(null), cond, dict(negative)]
        out = self.denoiser(torch.cat([x, x, x]), t3, batch_cond(conds, x.shape[0], (*NAMES, "negative condition")))
        x0_u, x0_c, x0_n = out.chunk(3, 0)
        w = per_row(scale_at(self.scale, t), x0_u)
        w_neg = per_row(scale_at(self.negative_scale, t), x0_u)
        return x0_u + w * (x0_c - x0_u) - w_neg * (x0_n - x0_u)
