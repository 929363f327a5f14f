"""DCI, dual-conditional inversion (Li et al., NeurIPS 2025, Alg. 1; official code P2P/dcInv.py).

Each inversion step s -> t starts from the DDIM-inversion candidate z_t^0 (destination label, see
``ddim.py``) and refines z_t by AdamW on the fixed-point residual of the ideal (implicit) inversion step,
whose network is evaluated at z_t itself:

    eps_raw = eps(z_t, t, c_src)
    eps_hat = eps_raw + lam (eps_ref - eps_raw) / ||eps_ref - eps_raw||_2     (reference-guided correction)
    f(z_t)  = alpha_t (z_s - sigma_s eps_hat) / alpha_s + sigma_t eps_hat
    L_fix   = mean (z_t - f(z_t))^2,   stop once L_fix < tol.

The correction is a step of length exactly ``lam`` (the non-squared norm over the whole sample) towards the
reference; the reference is the clean source image, as in the official code. The paper writes the squared
norm, with which lam = 2 would overshoot, so condiff follows the code. Gradients pass through the network.
With ``iterations = 0`` this is DDIM inversion bit for bit; ``lam = 0`` is fixed-point-only inversion.
Editing then samples with the source condition in CFG's null branch (``condiff.inversion.methods.DCIEdit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from condiff.core.denoiser import start_trajectory
from condiff.core.sampling import CountingDenoiser
from condiff.errors import ConfigError, NonFiniteError
from condiff.inversion.ddim import DestinationLabel, Inversion, check_grid, ddim_inversion_step, eps_from_x0
from condiff.inversion.per_sample import early_stopping_step, per_sample
from condiff.solvers.base import point
from condiff.solvers.ddim import DDIM


@dataclass(frozen=True)
class DCIResult:
    inversion: Inversion
    residuals: torch.Tensor  # (N, B): the fixed-point residual L_fix of each step after refinement
    iterations: torch.Tensor  # (N, B) long


def correction(eps_raw: torch.Tensor, eps_ref: torch.Tensor, lam: float) -> torch.Tensor:
    """eps_raw moved by exactly ``lam`` (per-sample L2 norm) towards eps_ref."""
    d = eps_ref - eps_raw
    norm = per_sample(d).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (d.dim() - 1)))
    return eps_raw + lam * d / norm


def dci_invert(
    denoiser,
    grid,
    x0: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    reference: torch.Tensor | None = None,
    iterations: int = 5,
    lam: float = 1.0,
    lr: float = 1e-3,
    tol: float = 5e-6,
    progress: bool | str = False,
) -> DCIResult:
    """DCI inversion of ``x0`` under ``cond`` (the source condition, guidance 1). ``reference`` defaults to x0."""
    grid = check_grid(grid)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ConfigError(f"iterations must be a non-negative integer, got {iterations!r}")
    ref = x0 if reference is None else reference
    D = CountingDenoiser(start_trajectory(denoiser), {k: v for k, v in (cond or {}).items() if k != "null"} or None)
    sch = denoiser.schedule
    asc = grid.flip(0)
    n, b = asc.numel() - 1, x0.shape[0]
    residuals, iters = torch.zeros(n, b), torch.zeros(n, b, dtype=torch.long)
    z_s, traj = x0, [x0]
    steps = range(n)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=progress if isinstance(progress, str) else "DCI inversion", leave=False)
    for i in steps:
        s, t = float(asc[i]), float(asc[i + 1])
        p, q = point(sch, s), point(sch, t)
        with torch.no_grad():  # the DDIM candidate, computed exactly as ``invert`` does (bit for bit)
            z_t = (
                ddim_inversion_step(D, z_s, s, t)
                if p.sigma == 0
                else DDIM().step(DestinationLabel(D, {s: t}), z_s, s, t, None, None)[0]
            )
        if iterations > 0:
            var = z_t.detach().clone().requires_grad_(True)
            opt = torch.optim.AdamW([var], lr=lr)
            active = torch.ones(b, dtype=torch.bool)
            for _ in range(iterations):
                eps_hat = correction(eps_from_x0(var, D(var, t), q), ref, lam)
                f = q.alpha * (z_s - p.sigma * eps_hat) / p.alpha + q.sigma * eps_hat
                loss = per_sample((var - f) ** 2).mean(1)
                active = early_stopping_step(opt, [var], loss, active, tol, residuals[i], iters[i])
                if not bool(active.any()):
                    break
            z_t = var.detach()
        if not bool(torch.isfinite(z_t).all()):
            raise NonFiniteError(f"non-finite values after DCI step {i} (t={s:.4g} -> {t:.4g}); lower lr")
        traj.append(z_t)
        z_s = z_t
    return DCIResult(Inversion(grid, tuple(reversed(traj)), D.nfe), residuals, iters)


def fixed_point_residual(denoiser, inversion: Inversion, cond=None) -> torch.Tensor:
    """(N, B): per step of an inversion, mean (z_t - f(z_t))^2 of the implicit DDIM step (lam = 0)."""
    D = CountingDenoiser(start_trajectory(denoiser), cond)
    asc, traj = inversion.grid.flip(0), inversion.trajectory[::-1]
    out = []
    with torch.no_grad():
        for i in range(asc.numel() - 1):
            p, q = point(denoiser.schedule, float(asc[i])), point(denoiser.schedule, float(asc[i + 1]))
            z_s, z_t = traj[i], traj[i + 1]
            eps = eps_from_x0(z_t, D(z_t, q.t), q)
            f = q.alpha * (z_s - p.sigma * eps) / p.alpha + q.sigma * eps
            out.append(per_sample((z_t - f) ** 2).mean(1))
    return torch.stack(out)
