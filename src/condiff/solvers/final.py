"""A second-order final step into sigma = 0 for any solver, at no extra model evaluation.

Every condiff solver (and every diffusers scheduler) ends with a first-order jump: the step from the last
noisy point rho_1 = sigma/alpha to the clean point returns the denoised estimate D_1 = D(x_1, t_1). At low
NFE that jump dominates the error (on diffusers' trailing grid with 10 steps rho_1 ~ 0.34 for a linear
beta table). The multistep update cannot be used there: the step is infinitely long in lambda.

In the variable rho = e^{-lambda} the step is finite. The PF-ODE in data prediction reads
d(y / rho)/d rho = -D / rho^2 for y = x / alpha (Lu et al. 2022, DPM-Solver++, eq. 9 with rho = e^{-lambda}),
so with D linear in rho on [0, rho_1], D(rho) = D_1 + (rho - rho_1) D', the exact solution at rho -> 0 is

    y(0) = D_1 - rho_1 D',     D' = (D_1 - D_2) / (rho_1 - rho_2),

the linear extrapolation of the last two denoised estimates to rho = 0: the second-order member of the same
exponential-integrator family, with rho instead of lambda as the expansion variable (the derivative uses the
previous step's estimate D_2 at rho_2, as DPM-Solver++(2M) does). ``ExtrapolatedFinal(base)`` runs ``base``
unchanged until the clean point, recording the first denoised estimate of each step (its start point), and
replaces the last step's output by the extrapolation. For a denoiser whose output is linear in rho along the
path the result is exact (tests/solvers/test_final.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Solver, point


@dataclass(frozen=True)
class FinalState:
    base: Any = None
    rho: float | None = None  # rho and D at the previous step's start
    d: Any = None


class _FirstCall:
    """Forwards to the bound denoiser and keeps the first output of the step (at its start point)."""

    def __init__(self, D):
        self.D, self.first = D, None

    @property
    def schedule(self):
        return self.D.schedule

    def __call__(self, x, t):
        out = self.D(x, t)
        if self.first is None:
            self.first = out
        return out


@dataclass(frozen=True)
class ExtrapolatedFinal(Solver):
    """``base`` with the step into sigma = 0 replaced by the rho-linear extrapolation of D (module docstring)."""

    base: Solver

    @property
    def name(self) -> str:
        return f"{self.base.name}+xfinal"

    @property
    def order(self) -> int:
        return self.base.order

    @property
    def stochastic(self) -> bool:
        return self.base.stochastic

    @property
    def convergence_order(self) -> int:
        return self.base.convergence_order

    def evals_per_step(self) -> int:
        return self.base.evals_per_step()

    def init_state(self, grid=None):
        return None if grid is None else FinalState(self.base.init_state(grid))

    def step(self, D, x, t, t_next, state, noise):
        st = state if state is not None else FinalState()
        p, q = point(D.schedule, t), point(D.schedule, t_next)
        rec = _FirstCall(D)
        x_next, base_state = self.base.step(rec, x, t, t_next, st.base, noise)
        if q.sigma == 0 and st.d is not None and p.rho != st.rho:
            slope = (rec.first - st.d) / (p.rho - st.rho)
            x_next = rec.first - p.rho * slope  # like every solver's step into sigma = 0: a clean sample
        return x_next, FinalState(base_state, p.rho, rec.first)
