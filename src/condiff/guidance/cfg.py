"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a Denoiser -> Denoiser object.

    x0_guided = contrast(x0_cond, x0_uncond, w) = x0_uncond + w (x0_cond - x0_uncond)

w = 1 is the conditional model, w = 0 the unconditional one (the diffusers convention). Because
x0 is affine in eps at fixed (x, t), mixing in x0 space equals mixing in eps space exactly. The condition
and the null condition are concatenated into one batch, layout [uncond, cond], so one forward serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from condiff.core.denoiser import Wrapper
from condiff.errors import ConfigError
from condiff.guidance.schedules import check_scale


def contrast(pos, neg, w):
    """neg + w (pos - neg): the primitive behind CFG, autoguidance and PAG."""
    return neg + w * (pos - neg)


def batch_cond(conds: list[Mapping[str, Any]]) -> dict:
    """Concatenate condition mappings along the batch dimension (tensors); other values must agree."""
    out = {}
    for key in conds[0]:
        vals = [c[key] for c in conds]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.cat(vals, 0)
        else:
            out[key] = vals[0]
    return out


def split_batch(x: torch.Tensor, n: int):
    return x.chunk(n, 0)


@dataclass
class CFG(Wrapper):
    """Classifier-free guidance. ``scale`` is a number or a function t -> number.

    The null condition is ``cond['null']`` (a mapping with the same keys), or ``null`` given here.
    ``skip_trivial``: at w = 1 (or 0) only the conditional (or null) branch is evaluated, one half-size
    forward instead of the batched pair; set False to always run the batched contrast."""

    denoiser: Any
    scale: float | Callable = 3.0
    null: Mapping[str, Any] | None = None
    skip_trivial: bool = True

    def __post_init__(self):
        check_scale(self.scale)

    def __call__(self, x, t, cond=None):
        cond = dict(cond or {})
        null = cond.pop("null", None) or self.null
        if null is None:
            raise ConfigError("CFG needs a null condition: pass cond['null'] or CFG(..., null=...)")
        w = self.scale(t) if callable(self.scale) else self.scale
        if self.skip_trivial and w == 1.0:
            return self.denoiser(x, t, cond)
        if self.skip_trivial and w == 0.0:
            return self.denoiser(x, t, null)
        tt = torch.as_tensor(t)
        t2 = torch.cat([tt, tt]) if tt.dim() == 1 else t
        both = self.denoiser(torch.cat([x, x]), t2, batch_cond([dict(null), cond]))
        x0_u, x0_c = split_batch(both, 2)
        return contrast(x0_c, x0_u, w)
