"""Heun's second-order method on the rescaled PF-ODE (Karras et al. 2022, Alg. 1).

Two evaluations per step; the step into sigma = 0 falls back to Euler (the correction would divide by 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Solver, point
from .euler import ode_slope


@dataclass(frozen=True)
class Heun(Solver):
    name = "heun"
    order = 2

    def evals_per_step(self):
        return 2

    def step(self, D, x, t, t_next, state, noise):
        p, q = point(D.schedule, t), point(D.schedule, t_next)
        y = x / p.alpha
        d = ode_slope(y, D(x, t), p.rho)
        y_euler = y + (q.rho - p.rho) * d
        if q.sigma == 0:
            return q.alpha * y_euler, state
        d_next = ode_slope(y_euler, D(q.alpha * y_euler, t_next), q.rho)
        return q.alpha * (y + (q.rho - p.rho) * 0.5 * (d + d_next)), state
