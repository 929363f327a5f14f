"""DPM-Solver++(2S), the singlestep second-order data-prediction solver (Lu et al. 2022b, "DPM-Solver++",
Alg. 1 with r = 1/2, i.e. the midpoint in lambda).

With lambda = log(alpha/sigma), h = lambda_n - lambda, the intermediate time s with lambda_s = lambda + r h
(r = 1/2; the schedule's t_from_log_snr gives s, and r is then recomputed from the exact lambda_s):

    u      = (sigma_s / sigma) x - alpha_s (exp(-r h) - 1) D(x, t)
    x_next = (sigma_n / sigma) x - alpha_n (exp(-h) - 1) [(1 - 1/(2r)) D(x, t) + 1/(2r) D(u, s)]

Two evaluations a step; the step into sigma = 0 returns D(x, t) (one evaluation). No state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from condiff.solvers.base import Solver, begin, point


@dataclass(frozen=True)
class DPMSolverPP2S(Solver):
    name = "dpmpp-2s"
    order = 2

    def evals_per_step(self):
        return 2

    def step(self, D, x, t, t_next, state, noise):
        p, q, d = begin(D, x, t, t_next)
        if q.sigma == 0:
            return d, state
        h = q.lam - p.lam
        lam_mid = torch.tensor(2.0 * (p.lam + 0.5 * h), dtype=torch.float64)
        s = point(D.schedule, float(D.schedule.t_from_log_snr(lam_mid)))
        r = (s.lam - p.lam) / h
        u = (s.sigma / p.sigma) * x - (s.alpha * math.expm1(-r * h)) * d
        d_mid = D(u, s.t)
        mix = (1.0 - 0.5 / r) * d + (0.5 / r) * d_mid
        return (q.sigma / p.sigma) * x - (q.alpha * math.expm1(-h)) * mix, state
