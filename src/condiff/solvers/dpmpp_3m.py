"""DPM-Solver++(3M), the multistep third-order data-prediction solver (Lu et al. 2022b, "DPM-Solver++",
sec. 4 and App. B).

With lambda = log(alpha/sigma), h = lambda_n - lambda, phi1 = exp(-h) - 1, phi2 = phi1/h + 1,
phi3 = phi2/h - 1/2 and the previous steps' h_0, h_1 (r0 = h_0/h, r1 = h_1/h):

    x'     = (sigma_n / sigma) x - alpha_n phi1 D                                  (order 1 = DDIM)
    D1_0   = (D - D_prev) / r0,   D1_1 = (D_prev - D_prev2) / r1
    D1     = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),   D2 = (D1_0 - D1_1) / (r0 + r1)
    x_next = x' + alpha_n phi2 D1 - alpha_n phi3 D2                                (order 3)

Note on the D2 term. D2 ~ h^2 D''/2 (D'' = d^2 D / d lambda^2), while the exact exponential integral of
the quadratic Taylor term is alpha_n h^3 phi_3(h) D'' = -2 alpha_n phi3 D2 (phi3 as above). The update
written above, the one of the reference implementation (LuChengTHU/dpm-solver) and of diffusers, carries
half of it, so it is exact only for D linear in lambda: its local error is O(h^3) and its global order 2
(measured: benchmarks/solver_order.py). ``taylor_exact=True`` uses -2 alpha_n phi3 D2, which is exact for
quadratic D and globally third order; the default stays with the reference/diffusers update so that
samples match them.

Warm-up: the first step is first order, the second is DPM-Solver++(2M) ('midpoint' form). With
``lower_order_final`` and a grid of fewer than 15 steps (the rule of diffusers' DPMSolverMultistepScheduler),
the last step is first order and the one before it at most second order; the grid comes from
``init_state(grid)``. A step into sigma = 0 returns D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from condiff.solvers.base import Solver, point

LOWER_ORDER_FINAL_BELOW = 15


@dataclass(frozen=True)
class History:
    """The denoised estimates and lambdas of the (up to 2) previous grid points, oldest first, and the number of
    steps left including the next one (None: unknown, no lower-order final steps)."""

    ds: tuple[torch.Tensor, ...] = ()
    lams: tuple[float, ...] = ()
    steps_left: int | None = None


@dataclass(frozen=True)
class DPMSolverPP3M(Solver):
    lower_order_final: bool = True
    taylor_exact: bool = False
    name = "dpmpp-3m"
    order = 3

    @property
    def convergence_order(self) -> int:
        return 3 if self.taylor_exact else 2

    def init_state(self, grid=None):
        steps = None if grid is None else len(grid) - 1
        if self.lower_order_final and steps is not None and steps < LOWER_ORDER_FINAL_BELOW:
            return History(steps_left=steps)
        return None

    def step_from_x0(self, schedule, x, t, t_next, d, state, noise):
        hist = state if state is not None else History()
        p, q = point(schedule, t), point(schedule, t_next)
        left = None if hist.steps_left is None else hist.steps_left - 1
        new = History((hist.ds + (d,))[-2:], (hist.lams + (p.lam,))[-2:], left)
        if q.sigma == 0:
            return d, new
        order = min(self.order, 1 + len(hist.ds))
        if hist.steps_left is not None:
            order = min(order, hist.steps_left)
        h = q.lam - p.lam
        phi1 = math.expm1(-h)
        x_next = (q.sigma / p.sigma) * x - (q.alpha * phi1) * d
        if order == 2:
            r0 = (p.lam - hist.lams[-1]) / h
            x_next = x_next - (0.5 * q.alpha * phi1 / r0) * (d - hist.ds[-1])
        elif order == 3:
            r0, r1 = (p.lam - hist.lams[-1]) / h, (hist.lams[-1] - hist.lams[-2]) / h
            d1_0, d1_1 = (d - hist.ds[-1]) / r0, (hist.ds[-1] - hist.ds[-2]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            w2 = 2.0 if self.taylor_exact else 1.0
            x_next = x_next + (q.alpha * phi2) * d1 - (w2 * q.alpha * phi3) * d2
        return x_next, new
