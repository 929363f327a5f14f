"""DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022b, Alg. 2).

With lambda = log(alpha/sigma), h = lambda_n - lambda and phi1 = exp(-h) - 1:

    x'     = (sigma_n / sigma) x - alpha_n phi1 D                      (first order = DDIM)
    x_next = x' - 1/2 alpha_n phi1 (D - D_prev) / r,  r = h_prev / h   (second order, 'midpoint' form)

The state is (D_prev, lambda_prev). The first step is first order; a step into sigma = 0 returns D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from condiff.solvers.base import Solver, point


@dataclass(frozen=True)
class DPMSolverPP2M(Solver):
    name = "dpmpp-2m"
    order = 2

    def step_from_x0(self, schedule, x, t, t_next, d, state, noise):
        p, q = point(schedule, t), point(schedule, t_next)
        if q.sigma == 0:
            return d, (d, p.lam)
        h = q.lam - p.lam
        phi1 = math.expm1(-h)
        x_next = (q.sigma / p.sigma) * x - (q.alpha * phi1) * d
        if state is not None:
            d_prev, lam_prev = state
            r = (p.lam - lam_prev) / h
            x_next = x_next - (0.5 * q.alpha * phi1 / r) * (d - d_prev)
        return x_next, (d, p.lam)
