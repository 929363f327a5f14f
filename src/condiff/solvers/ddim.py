"""DDIM (Song, Meng & Ermon 2021, eq. 12), general schedule form.

    x_next = alpha_n x0 + sqrt(sigma_n^2 - c^2) eps_hat + c z,
    c^2 = eta^2 sigma_n^2 (1 - (alpha sigma_n)^2 / (alpha_n sigma)^2)

eta = 0 is deterministic (= DPM-Solver-1); eta = 1 is the DDPM posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from condiff.solvers.base import Solver, point


@dataclass(frozen=True)
class DDIM(Solver):
    eta: float = 0.0
    name = "ddim"
    order = 1

    @property
    def stochastic(self):  # type: ignore[override]
        return self.eta > 0

    def step_from_x0(self, schedule, x, t, t_next, x0, state, noise):
        p, q = point(schedule, t), point(schedule, t_next)
        if q.sigma == 0:
            return x0, state
        eps = (x - p.alpha * x0) / p.sigma
        c2 = self.eta**2 * q.sigma**2 * (1 - (p.alpha * q.sigma) ** 2 / (q.alpha * p.sigma) ** 2)
        c2 = max(c2, 0.0)
        x_next = q.alpha * x0 + math.sqrt(max(q.sigma**2 - c2, 0.0)) * eps
        if c2 > 0:
            x_next = x_next + math.sqrt(c2) * noise.sample(x)
        return x_next, state
