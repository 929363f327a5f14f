"""Null-text inversion (Mokady, Hertz, Aberman, Pritch & Cohen-Or, CVPR 2023, Alg. 1).

1. Pivot: DDIM inversion at guidance 1 with the source condition (``condiff.inversion.ddim.invert``).
2. Walking down the grid from the pivot's noise, at each step i optimise the null condition so that one
   guided DDIM step lands on the pivot: minimise || DDIM(z_bar, CFG_w(null_i)) - z*_{i+1} ||^2 with a fresh
   Adam at lr_i = lr (1 - i / max(100, 2N)) (the paper's 1e-2 (1 - i/100) for N <= 50), for at most
   ``inner_steps`` Adam steps, stopping early once the loss is below ``early_stop + i * early_stop_slope`` (paper:
   1e-5 + i 2e-5). null_i
   starts from null_{i-1} and is stored after its last Adam step; z_bar then advances with it.
   condiff tests the threshold *before* each Adam step: the paper's loop steps first and tests after, so
   its first step (of size ~lr on every entry) is taken even when the loss already meets the threshold,
   which on a model that inverts well makes the reconstruction worse (shapes: 40.7 dB against DDIM's 48).
3. Editing samples from the pivot's noise with the stored per-step nulls in the null branch of CFG
   (``StepwiseNull``).

The loss is per sample, the nulls are per sample and Adam is elementwise, so a batch is a set of
independent inversions, each with its own early stop. Only the null's floating tensors are optimised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from condiff.core.denoiser import Wrapper, start_trajectory
from condiff.core.sampling import CountingDenoiser
from condiff.errors import ConfigError
from condiff.guidance.cfg import contrast
from condiff.inversion.ddim import Inversion, check_grid, invert
from condiff.inversion.per_sample import early_stopping_step, per_sample
from condiff.solvers.ddim import DDIM


@dataclass(frozen=True)
class NullText:
    """The pivot inversion, the optimised null condition for each step (``nulls[k]`` is used on the step
    grid[k] -> grid[k+1]), and per step and sample the final loss and the Adam iterations taken."""

    pivot: Inversion
    nulls: tuple[dict, ...]
    losses: torch.Tensor  # (N, B)
    iterations: torch.Tensor  # (N, B) long
    nfe: int


def learning_rate(lr: float, i: int, steps: int) -> float:
    return lr * (1.0 - i / max(100, 2 * steps))


def _floating(null: Mapping[str, Any]) -> list[str]:
    return [k for k, v in null.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def null_text_inversion(
    denoiser,
    grid,
    x0: torch.Tensor,
    cond: Mapping[str, Any],
    scale: float = 7.5,
    inner_steps: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
    progress: bool | str = False,
    early_stop_slope: float = 2e-5,
) -> NullText:
    """Null-text inversion of ``x0`` under ``cond`` (which holds 'null', the starting null condition)."""
    grid = check_grid(grid)
    if "null" not in cond:
        raise ConfigError("null-text inversion needs cond['null'], the null condition to optimise")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise ConfigError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
    cond_c = {k: v for k, v in cond.items() if k != "null"}
    null = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in cond["null"].items()}
    keys = _floating(null)
    if not keys:
        raise ConfigError("the null condition has no floating-point tensor to optimise")
    ddim, n, b = DDIM(), grid.numel() - 1, x0.shape[0]
    with torch.no_grad():
        pivot = invert(denoiser, ddim, grid, x0, cond_c)
    count = CountingDenoiser(start_trajectory(denoiser), None)
    z = pivot.latent
    nulls, losses, iters = [], torch.zeros(n, b), torch.zeros(n, b, dtype=torch.long)
    steps = range(n)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=progress if isinstance(progress, str) else "null-text inversion", leave=False)
    for i in steps:
        t, s = float(grid[i]), float(grid[i + 1])
        target = pivot.trajectory[i + 1]
        with torch.no_grad():
            count.cond = cond_c
            x0_c = count(z, t)
        params = [null[k].detach().clone().requires_grad_(True) for k in keys]
        opt = torch.optim.Adam(params, lr=learning_rate(lr, i, n))
        active = torch.ones(b, dtype=torch.bool)
        threshold = early_stop + i * early_stop_slope
        for _ in range(inner_steps):
            count.cond = {**null, **dict(zip(keys, params))}
            guided = contrast(x0_c, count(z, t), scale)
            z_prev, _ = ddim.step_from_x0(denoiser.schedule, z, t, s, guided, None, None)
            loss = per_sample((z_prev - target) ** 2).mean(1)
            active = early_stopping_step(opt, params, loss, active, threshold, losses[i], iters[i])
            if not bool(active.any()):
                break
        null = {**null, **{k: p.detach() for k, p in zip(keys, params)}}
        nulls.append(dict(null))
        with torch.no_grad():
            count.cond = null
            x0_u = count(z, t)
            z, _ = ddim.step_from_x0(denoiser.schedule, z, t, s, contrast(x0_c, x0_u, scale), None, None)
    return NullText(pivot, tuple(nulls), losses, iters, pivot.nfe + count.nfe)


@dataclass
class StepwiseNull(Wrapper):
    """Denoiser wrapper: at grid time ``grid[k]`` it puts ``nulls[k]`` in cond['null'], so a CFG inside it
    uses the null-text embedding of that step. Wrap a CFG: ``StepwiseNull(CFG(D, w), grid, nulls)``."""

    denoiser: Any
    grid: torch.Tensor
    nulls: tuple[dict, ...]

    def __post_init__(self):
        self._index = {float(t): k for k, t in enumerate(self.grid[:-1])}

    def __call__(self, x, t, cond=None):
        k = self._index.get(float(t))
        if k is None:
            raise ConfigError(f"time {float(t)!r} is not on the grid the null-text embeddings were fitted on")
        return self.denoiser(x, t, {**dict(cond or {}), "null": self.nulls[k]})
