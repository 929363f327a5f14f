"""Euler on the probability-flow ODE in Karras form (Karras et al. 2022, Alg. 1 without the correction).

With y = x / alpha and rho = sigma / alpha the PF-ODE is dy/drho = (y - D(x, t)) / rho; one Euler step is
y_next = y + (rho_next - rho) (y - x0) / rho. (Algebraically this equals DDIM with eta = 0.)
"""

from __future__ import annotations

from dataclasses import dataclass

from condiff.solvers.base import Solver, point


def ode_slope(y, x0, rho):
    """dy/drho of the rescaled PF-ODE."""
    return (y - x0) / rho


@dataclass(frozen=True)
class Euler(Solver):
    name = "euler"
    order = 1

    def step_from_x0(self, schedule, x, t, t_next, x0, state, noise):
        p, q = point(schedule, t), point(schedule, t_next)
        y = x / p.alpha
        y_next = y + (q.rho - p.rho) * ode_slope(y, x0, p.rho)
        return q.alpha * y_next, state
