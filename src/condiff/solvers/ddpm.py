"""DDPM ancestral sampling (Ho et al. 2020, eqs. 6-7): draw x_s from the Gaussian posterior
q(x_s | x_t, x0_hat), written for any schedule with alpha_{t|s} = alpha_t / alpha_s and
sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (Kingma et al. 2021, VDM eq. 6-7):

    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0_hat
    var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from condiff.solvers.base import Solver, point


@dataclass(frozen=True)
class DDPM(Solver):
    name = "ddpm"
    order = 1
    stochastic = True

    def step_from_x0(self, schedule, x, t, t_next, x0, state, noise):
        p, q = point(schedule, t), point(schedule, t_next)
        if q.sigma == 0:
            return x0, state
        a_ts = p.alpha / q.alpha
        var_ts = max(p.sigma**2 - a_ts**2 * q.sigma**2, 0.0)
        mean = (a_ts * q.sigma**2 / p.sigma**2) * x + (q.alpha * var_ts / p.sigma**2) * x0
        std = math.sqrt(var_ts * q.sigma**2 / p.sigma**2)
        return mean + std * noise.sample(x), state
