"""EDM's samplers (Karras, Aittala, Aila, Laine, "Elucidating the design space of diffusion-based generative
models", NeurIPS 2022), on the rescaled PF-ODE dy/drho = (y - D(x, t)) / rho with y = x / alpha and
rho = sigma / alpha, so they run on every schedule (VP via x / alpha, EDM with alpha = 1, flow).

- ``EDMHeun`` ("edm-heun"): Algorithm 1, the deterministic sampler: Heun's second-order method (eq. 1 / sec. 3)
  on the Karras sigma grid (eq. 5, rho = 7, its ``default_spacing``), Euler on the last step into sigma = 0.
  N steps cost 2N - 1 evaluations (35 NFE for N = 18). It is the same step as ``heun`` (the shared
  ``heun_step``); what makes it EDM's sampler is the grid.
- ``EDMSDE`` ("edm-sde"): Algorithm 2, the stochastic sampler. At each grid level rho_i with
  S_min <= rho_i <= S_max it first "churns": gamma_i = min(S_churn / N, sqrt(2) - 1), rho_hat = rho_i
  (1 + gamma_i), y_hat = y + sqrt(rho_hat^2 - rho_i^2) S_noise z (z ~ N(0, I) from the NoiseSource), then
  takes the Heun step from rho_hat to rho_{i+1}. N, the number of steps of the grid, comes from
  ``init_state(grid)``; without a grid (N unknown) gamma is the cap sqrt(2) - 1 wherever S_churn > 0. rho_hat
  is capped at the schedule's t_max (a VP schedule is not defined beyond it). With S_churn = 0 (or no level
  in [S_min, S_max]) it draws no noise and equals ``heun`` exactly.

Defaults of EDMSDE: the ImageNet-64 settings of the NVlabs/edm README (S_churn 40, S_min 0.05, S_max 50,
S_noise 1.003; they used 256 steps, where gamma = 40/256; with fewer steps gamma reaches its cap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from condiff.core.grids import Karras
from condiff.errors import ConfigError
from condiff.solvers.base import Solver, point
from condiff.solvers.heun import heun_step

GAMMA_CAP = math.sqrt(2.0) - 1.0


@dataclass(frozen=True)
class EDMHeun(Solver):
    """Karras et al. 2022, Alg. 1: deterministic Heun on the Karras grid (2N - 1 NFE)."""

    name = "edm-heun"
    order = 2
    default_spacing = Karras()

    def evals_per_step(self):
        return 2

    def step(self, D, x, t, t_next, state, noise):
        return heun_step(D, x, point(D.schedule, t), point(D.schedule, t_next)), state


def _check(name: str, value, lo: float, allow_inf: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= lo
    ok = ok and (math.isfinite(value) or (allow_inf and value == math.inf))
    if not ok:
        what = "a number" + (" (or inf)" if allow_inf else "") + f" >= {lo}"
        raise ConfigError(f"edm-sde {name} must be {what}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EDMSDE(Solver):
    """Karras et al. 2022, Alg. 2: churn (add noise up to rho_hat) then Heun; state = N (steps in the grid)."""

    S_churn: float = 40.0
    S_min: float = 0.05
    S_max: float = 50.0
    S_noise: float = 1.003
    name = "edm-sde"
    order = 2  # of its Heun part; with churn the trajectory is stochastic
    stochastic = True
    default_spacing = Karras()

    def __post_init__(self):
        _check("S_churn", self.S_churn, 0.0)
        _check("S_min", self.S_min, 0.0)
        _check("S_max", self.S_max, 0.0, allow_inf=True)
        _check("S_noise", self.S_noise, 0.0)
        if self.S_min > self.S_max:
            raise ConfigError(f"edm-sde S_min ({self.S_min}) must not exceed S_max ({self.S_max})")

    def evals_per_step(self):
        return 2

    def init_state(self, grid=None):
        return None if grid is None else len(grid) - 1

    def gamma(self, rho: float, steps: int | None) -> float:
        """gamma_i at noise level rho for a grid of ``steps`` steps (None: unknown)."""
        if self.S_churn == 0 or not self.S_min <= rho <= self.S_max:
            return 0.0
        return GAMMA_CAP if steps is None else min(self.S_churn / steps, GAMMA_CAP)

    def step(self, D, x, t, t_next, state, noise):
        sch = D.schedule
        p, q = point(sch, t), point(sch, t_next)
        gamma = self.gamma(p.rho, state)
        if gamma > 0:
            lam_hat = torch.tensor(-2.0 * math.log(p.rho * (1.0 + gamma)), dtype=torch.float64)
            t_hat = min(float(sch.t_from_log_snr(lam_hat)), sch.t_max)
            if t_hat > p.t:
                p_hat = point(sch, t_hat)
                spread = math.sqrt(max(p_hat.rho**2 - p.rho**2, 0.0)) * self.S_noise
                x = p_hat.alpha * (x / p.alpha + spread * noise.sample(x))
                p = p_hat
        return heun_step(D, x, p, q), state
