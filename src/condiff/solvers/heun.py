"""Heun's second-order method on the rescaled PF-ODE (Karras et al. 2022, Alg. 1).

Two evaluations per step; the step into sigma = 0 falls back to Euler (the correction would divide by 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from condiff.solvers.base import Point, Solver, point
from condiff.solvers.euler import ode_slope


def heun_step(D, x, p: Point, q: Point):
    """One Heun step of the rescaled PF-ODE dy/drho = (y - D) / rho from point p to point q (any times,
    not only grid times: EDM's stochastic sampler starts it from its churned noise level)."""
    y = x / p.alpha
    d = ode_slope(y, D(x, p.t), p.rho)
    y_euler = y + (q.rho - p.rho) * d
    if q.sigma == 0:
        return q.alpha * y_euler
    d_next = ode_slope(y_euler, D(q.alpha * y_euler, q.t), q.rho)
    return q.alpha * (y + (q.rho - p.rho) * 0.5 * (d + d_next))


@dataclass(frozen=True)
class Heun(Solver):
    name = "heun"
    order = 2

    def evals_per_step(self):
        return 2

    def step(self, D, x, t, t_next, state, noise):
        return heun_step(D, x, point(D.schedule, t), point(D.schedule, t_next)), state
