"""Deterministic inversion: the sampler's own step functions run on the ascending grid.

DDIM inversion (Song et al. 2021, sec. 4.3; Mokady et al. 2023, eq. 2-3) integrates the PF-ODE from the
image towards noise. For a step s -> t (t > s), with the network evaluated on the *current* latent x_s but
at the *destination* label t (the convention of prompt-to-prompt, null-text and DDPM inversion):

    eps_hat = eps(x_s, t),   x_t = alpha_t (x_s - sigma_s eps_hat) / alpha_s + sigma_t eps_hat.

``DestinationLabel`` presents that evaluation to any solver as a denoiser at time s, so the DDIM solver's
ordinary ``step`` with t_next > t *is* this formula. With ``destination_label=False`` the solver evaluates
the network at the current label, the literal ODE step run backwards, which is what a multistep solver
such as DPM-Solver++(2M) needs to keep its order. The first step leaves the clean point (sigma = 0), where
no solver step is defined, and is always the closed-form DDIM step above. Its error is O(sigma_1^2).
The returned trajectory is the "pivot" that null-text inversion fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from condiff.core.denoiser import check_batch, start_trajectory
from condiff.core.sampling import CountingDenoiser, StepInfo
from condiff.errors import ConfigError, NonFiniteError
from condiff.solvers.base import point


@dataclass(frozen=True)
class Inversion:
    """x at every point of the descending sampling ``grid``: ``trajectory[k]`` is x at ``grid[k]``, so
    ``trajectory[0]`` is the inverted noise and ``trajectory[-1]`` the input image."""

    grid: torch.Tensor
    trajectory: tuple[torch.Tensor, ...]
    nfe: int

    @property
    def latent(self) -> torch.Tensor:
        return self.trajectory[0]


def check_grid(grid) -> torch.Tensor:
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2 or not bool(torch.all(grid[1:] < grid[:-1])):
        raise ConfigError(
            "grid must be a 1-D, strictly descending tensor with at least 2 points (the sampling "
            "grid; inversion runs it backwards)"
        )
    return grid


def eps_from_x0(x, x0, p):
    return (x - p.alpha * x0) / p.sigma


@dataclass
class DestinationLabel:
    """A denoiser view for ascending steps: called at grid time s, it evaluates ``denoiser`` at the next
    (higher) grid time t and returns the x0 at s that shares that noise estimate, (x - sigma_s eps_hat)/alpha_s."""

    denoiser: Any  # x, t -> x0 (condition bound)
    next_time: Mapping[float, float]

    @property
    def schedule(self):
        return self.denoiser.schedule

    def __call__(self, x, s):
        s = float(s)
        p, q = point(self.schedule, s), point(self.schedule, self.next_time[s])
        eps = eps_from_x0(x, self.denoiser(x, q.t), q)
        return (x - p.sigma * eps) / p.alpha


def ddim_inversion_step(D, x, s: float, t: float) -> torch.Tensor:
    """The closed-form DDIM inversion step s -> t with the destination label (valid at sigma_s = 0)."""
    p, q = point(D.schedule, s), point(D.schedule, t)
    eps = eps_from_x0(x, D(x, t), q)
    return q.alpha * (x - p.sigma * eps) / p.alpha + q.sigma * eps


def invert(
    denoiser,
    solver,
    grid,
    x: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    *,
    destination_label: bool = True,
    callbacks: Iterable[Callable[[StepInfo], None]] = (),
    progress: bool | str = False,
) -> Inversion:
    """Invert ``x`` (the image at ``grid[-1]``) to ``grid[0]`` with a deterministic ``solver``.

    ``denoiser`` may be guided (``CFG(D, w)``); sampling ``trajectory[0]`` back down the same grid with the
    same solver and guidance reconstructs ``x`` up to the solver's discretisation error. ``x`` must be a
    floating-point tensor with a batch dimension (``check_batch``)."""
    grid = check_grid(grid)
    check_batch(x)
    if solver.stochastic:
        raise ConfigError(f"inversion needs a deterministic solver, got {solver.name!r} (use ddim, dpmpp-2m, ...)")
    asc = grid.flip(0)
    D = CountingDenoiser(start_trajectory(denoiser), cond)
    traj = [x]
    state = solver.init_state()
    nxt = {float(asc[i]): float(asc[i + 1]) for i in range(asc.numel() - 1)}
    view = DestinationLabel(D, nxt) if destination_label else D
    steps = range(asc.numel() - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=progress if isinstance(progress, str) else f"{solver.name} inversion", leave=False)
    for i in steps:
        s, t = float(asc[i]), float(asc[i + 1])
        if point(D.schedule, s).sigma == 0:
            x = ddim_inversion_step(D, x, s, t)
        else:
            x, state = solver.step(view, x, s, t, state, None)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"non-finite values in x after inversion step {i} (t={s:.4g} -> {t:.4g})")
        traj.append(x)
        for cb in callbacks:
            cb(StepInfo(i, s, t, x, D.last, D.nfe))
    return Inversion(grid, tuple(reversed(traj)), D.nfe)
