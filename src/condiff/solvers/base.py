"""The solver contract.

A solver is a frozen object whose ``step`` is pure:

    x_next, state = solver.step(D, x, t, t_next, state, noise)

``D(x, t)`` is a denoiser with its condition bound (returns x0_hat); ``state`` is the solver's explicit
history (``init_state(grid)`` at the start of a trajectory; solvers whose order schedule depends on the
number of steps left, like DPM-Solver++(3M)'s lower-order final steps, read it from the grid, and
``init_state()`` without a grid means "unknown", which every solver accepts); ``noise`` is a NoiseSource, used only by
stochastic solvers. Steps into the clean point (sigma = 0) return the denoised estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Point:
    """alpha, sigma and lambda = log(alpha/sigma) at one grid time, as float64 Python floats."""

    t: float
    alpha: float
    sigma: float

    @property
    def lam(self) -> float:
        return math.log(self.alpha / self.sigma) if self.sigma > 0 else math.inf

    @property
    def rho(self) -> float:
        """sigma / alpha: the noise level of the rescaled variable x / alpha (Karras et al. 2022)."""
        return self.sigma / self.alpha


def point(schedule, t) -> Point:
    tt = torch.as_tensor(float(t), dtype=torch.float64)
    return Point(float(t), float(schedule.alpha(tt)), float(schedule.sigma(tt)))


def begin(D, x, t, t_next) -> tuple[Point, Point, torch.Tensor]:
    """The step's two grid points and the denoised estimate x0_hat = D(x, t)."""
    return point(D.schedule, t), point(D.schedule, t_next), D(x, t)


class Solver:
    name: str = "?"
    order: int = 1
    stochastic: bool = False
    default_spacing = None  # a spacing object (condiff.core.grids) the solver is meant for; None: no preference

    def init_state(self, grid=None):
        """The state before the first step; ``grid`` is the whole descending time grid when known."""
        return None

    @property
    def convergence_order(self) -> int:
        """The global order of accuracy in the step size (what the order protocol measures)."""
        return self.order

    def step(self, D, x, t, t_next, state, noise):
        raise NotImplementedError

    def evals_per_step(self) -> int:
        return 1
