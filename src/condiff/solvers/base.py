"""The solver contract.

A solver is a frozen object whose ``step`` is pure:

    x_next, state = solver.step(D, x, t, t_next, state, noise)

``D(x, t)`` is a denoiser with its condition bound (returns x0_hat); ``state`` is the solver's explicit
history (``init_state(grid)`` at the start of a trajectory; solvers whose order schedule depends on the
number of steps left, like DPM-Solver++(3M)'s lower-order final steps, read it from the grid, and
``init_state()`` without a grid means "unknown", which every solver accepts); ``noise`` is a NoiseSource, used only by
stochastic solvers. Steps into the clean point (sigma = 0) return the denoised estimate.

A solver with one evaluation per step also steps from a denoised estimate it is given:

    x_next, state = solver.step_from_x0(schedule, x, t, t_next, x0_hat, state, noise)

is the step with ``D(x, t)`` replaced by ``x0_hat`` (``step`` is exactly this with x0_hat = D(x, t)), for
callers that compute x0_hat themselves (null-text inversion's guided estimate, DC-Solver's compensated output).
Solvers that evaluate the denoiser more than once a step (heun, dpmpp-2s, edm-heun, edm-sde) raise a
ConfigError from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from condiff.core.schedules import GridTime, alpha_sigma
from condiff.errors import ConfigError


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
    """alpha, sigma at t; a ``GridTime`` of this schedule (``sample``'s grid times) gives the values it holds."""
    if isinstance(t, GridTime) and t.schedule is schedule:
        return Point(float(t), t.alpha, t.sigma)
    tt = torch.as_tensor(float(t), dtype=torch.float64)
    a, s = alpha_sigma(schedule, tt)
    return Point(float(t), float(a), float(s))


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
        """One step from t to t_next with one evaluation x0_hat = D(x, t): ``step_from_x0`` with it. Solvers that
        evaluate more than once a step override this."""
        return self.step_from_x0(D.schedule, x, t, t_next, D(x, t), state, noise)

    def step_from_x0(self, schedule, x, t, t_next, x0_hat, state, noise):
        """The step from t to t_next given the denoised estimate x0_hat at (x, t): (x_next, state)."""
        raise ConfigError(
            f"solver {self.name!r} evaluates the denoiser {self.evals_per_step()} times a step, so it "
            f"cannot step from one given x0_hat; use a one-evaluation solver (ddim, dpmpp-2m, ...)"
        )

    def evals_per_step(self) -> int:
        return 1
