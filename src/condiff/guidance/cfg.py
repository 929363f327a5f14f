"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a Denoiser -> Denoiser object.

    x0_guided = contrast(x0_cond, x0_uncond, w) = x0_uncond + w (x0_cond - x0_uncond)

w = 1 is the conditional model, w = 0 the unconditional one (the diffusers convention). Because
x0 is affine in eps at fixed (x, t), mixing in x0 space equals mixing in eps space exactly. The condition
and the null condition are concatenated into one batch, layout [uncond, cond], so one forward serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from condiff.core.denoiser import Wrapper, check_cond_rows, describe
from condiff.errors import ConfigError
from condiff.guidance.schedules import check_scale


def contrast(pos, neg, w):
    """neg + w (pos - neg): the primitive behind CFG, autoguidance and PAG."""
    return neg + w * (pos - neg)


def batch_cond(
    conds: Sequence[Mapping[str, Any]], rows: int | Sequence[int] | None = None, names: Sequence[str] | None = None
) -> dict:
    """Concatenate condition mappings along the batch dimension, for one forward over several branches.

    ``rows`` is the number of samples each mapping is for (one int for all); every tensor with a batch dimension
    must then have that many rows (``check_cond_rows``: the one check of every method that batches conditions),
    and a 0-d tensor is shared by its branch's samples: kept as it is where every mapping holds the same value,
    else expanded to its rows. ``names`` label the mappings in errors (default: 'condition'); the one named
    'condition' is checked first, so an error names the caller's own condition before a null derived from it.
    A key that holds a tensor in one mapping must hold one in every mapping; other values are the first
    mapping's (keys that hold no tensor anywhere and are missing from the first are left out)."""
    rows = None if rows is None else [rows] * len(conds) if isinstance(rows, int) else list(rows)
    names = list(names) if names is not None else ["condition"] * len(conds)
    if rows is not None:
        for i in sorted(range(len(conds)), key=lambda i: names[i] != "condition"):
            check_cond_rows(conds[i], rows[i], names[i])
    out = {}
    for key in dict.fromkeys(k for c in conds for k in c):
        have = [key in c for c in conds]
        is_tensor = [key in c and isinstance(c[key], torch.Tensor) for c in conds]
        if not any(is_tensor):  # not network input by rows (a nested null, a method's extras): the first's
            if have[0]:
                out[key] = conds[0][key]
            continue
        has = names[is_tensor.index(True)]
        if not all(have):
            lacks = names[have.index(False)]
            raise ConfigError(f"{lacks} has no {key!r} ({has} has it; the branches need the same tensor keys)")
        vals = [c[key] for c in conds]
        if not all(is_tensor):
            i = is_tensor.index(False)
            raise ConfigError(f"{names[i]} {key!r} is {describe(vals[i])} but {has} {key!r} is a tensor")
        shared = [v.dim() == 0 for v in vals]
        if all(shared) and all(torch.equal(v, vals[0]) for v in vals[1:]):
            out[key] = vals[0]
        elif any(shared) and rows is not None:
            out[key] = torch.cat([v.expand(r) if v.dim() == 0 else v for v, r in zip(vals, rows)], 0)
        elif any(shared):
            raise ConfigError(f"condition {key!r} differs between branches as a 0-d tensor; batching it needs rows")
        elif len({v.shape[1:] for v in vals}) > 1:
            shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in zip(names, vals))
            raise ConfigError(f"condition {key!r} has a different shape per branch beyond its rows: {shapes}")
        else:
            out[key] = torch.cat(vals, 0)
    return out


NAMES = ("null condition", "condition")  # batch_cond's labels of CFG's [null, cond] layout


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
        both = self.denoiser(torch.cat([x, x]), t2, batch_cond([dict(null), cond], x.shape[0], NAMES))
        x0_u, x0_c = split_batch(both, 2)
        return contrast(x0_c, x0_u, w)
