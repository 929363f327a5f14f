"""UniPC, the unified predictor-corrector (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC", NeurIPS; Alg. 2 and 3,
eqs. 8-10 in data prediction, the "bh" variants).

Going from point i-1 (model output m_{i-1}) to point i, with h = lambda_i - lambda_{i-1}, hh = -h and
x' = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h) - 1) m_{i-1} (= DDIM):

    B(h) = hh (bh1) or exp(hh) - 1 (bh2)
    g_1 = (exp(hh) - 1)/hh - 1,  g_{n+1} = g_n/hh - 1/(n+1)!,  b_n = g_n n! / B(h)
    r_k = (lambda_{i-1-k} - lambda_{i-1}) / h,  D1_k = (m_{i-1-k} - m_{i-1}) / r_k,  R[n, k] = r_k^n

UniP-p (predictor): rho solves R[:p-1, :p-1] rho = b[:p-1] (p = 2: rho = 1/2);
    x~_i = x' - alpha_i B(h) sum_k rho_k D1_k.
UniC (corrector of a UniP-p step, order p + 1): m_i = model(x~_i), D1_i = m_i - m_{i-1}, rho^c solves the
p x p system with r = 1 appended for the new point (p = 1: rho^c = 1/2);
    x_i = x' - alpha_i B(h) (sum_k rho^c_k D1_k + rho^c_p D1_i).

m_i is reused as the model output at the corrected x_i (no extra evaluation), so the corrector of step i
runs at the start of step i+1, from the ``Pending`` record in the state; no corrector follows the final step.
Warm-up uses order min(p, points seen); with ``lower_order_final`` (as diffusers' UniPCMultistepScheduler)
the order is also at most the number of steps left, known from ``init_state(grid)``. A step into sigma = 0
returns the model's denoised estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from condiff.errors import ConfigError, one_of
from condiff.solvers.base import Point, Solver, point


@dataclass(frozen=True)
class BH1:
    """B(h) = hh (the variant the UniPC paper recommends for unconditional sampling at very few steps)."""

    name = "bh1"

    def B(self, hh: float) -> float:
        return hh


@dataclass(frozen=True)
class BH2:
    """B(h) = exp(hh) - 1 (recommended for guided sampling)."""

    name = "bh2"

    def B(self, hh: float) -> float:
        return math.expm1(hh)


VARIANTS = {"bh1": BH1(), "bh2": BH2()}


@dataclass(frozen=True)
class Pending:
    """The step whose corrector is still due: the sample it started from, its start point and its order."""

    x: torch.Tensor
    start: Point
    order: int


@dataclass(frozen=True)
class UniPCState:
    """Model outputs and lambdas of the latest points (oldest first, the last one is the current step's start),
    the pending corrector and the steps left including the next one (None: unknown)."""

    ms: tuple[torch.Tensor, ...] = ()
    lams: tuple[float, ...] = ()
    pending: Pending | None = None
    steps_left: int | None = None


def _b(h: float, n: int, variant) -> tuple[float, list[float]]:
    """B(h) and b_1..b_n."""
    hh = -h
    B = variant.B(hh)
    g, fact, b = math.expm1(hh) / hh - 1.0, 1, []
    for k in range(1, n + 1):
        b.append(g * fact / B)
        fact *= k + 1
        g = g / hh - 1.0 / fact
    return B, b


def _solve(rks: list[float], b: list[float]) -> list[float]:
    R = torch.tensor([[r**n for r in rks] for n in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _update(x, start: Point, end: Point, ms, lams, order: int, variant, m_new=None):
    """UniP-order from ``start`` to ``end`` (m_new None), or the UniC correction of that step given
    m_new = model(x~ at end). ``ms``/``lams`` end with the start point's entries."""
    h = end.lam - start.lam
    m0 = ms[-1]
    x_lin = (end.sigma / start.sigma) * x - (end.alpha * math.expm1(-h)) * m0
    rks = [(lams[-1 - k] - start.lam) / h for k in range(1, order)]
    d1s = [(ms[-1 - k] - m0) / r for k, r in zip(range(1, order), rks)]
    B, b = _b(h, order, variant)
    if m_new is None:
        if order == 1:
            return x_lin
        rho = [0.5] if order == 2 else _solve(rks, b[: order - 1])
        return x_lin - (end.alpha * B) * sum(c * d for c, d in zip(rho, d1s))
    rho = [0.5] if order == 1 else _solve(rks + [1.0], b[:order])
    res = rho[-1] * (m_new - m0)
    for c, d in zip(rho[:-1], d1s):
        res = res + c * d
    return x_lin - (end.alpha * B) * res


@dataclass(frozen=True)
class UniPC(Solver):
    order: int = 2
    variant: str = "bh2"
    corrector: bool = True
    lower_order_final: bool = True
    name = "unipc"

    def __post_init__(self):
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ConfigError(f"unipc order must be 1, 2 or 3, got {self.order!r}")
        if self.variant not in VARIANTS:
            raise one_of("unipc variant", self.variant, VARIANTS)
        for flag in ("corrector", "lower_order_final"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"unipc {flag} must be true or false, got {getattr(self, flag)!r}")

    @property
    def convergence_order(self) -> int:
        return self.order + int(self.corrector)

    def init_state(self, grid=None):
        if self.lower_order_final and grid is not None:
            return UniPCState(steps_left=len(grid) - 1)
        return None

    def step_from_x0(self, schedule, x, t, t_next, m, state, noise):
        p, q = point(schedule, t), point(schedule, t_next)
        return self.predict(self.correct(x, p, m, state), p, q, m, state)

    # The two halves of ``step``, public so that DC-Solver (dc_solver.py) can change m between them.

    def correct(self, x, p: Point, m, state):
        """UniC: the corrected sample at ``p`` given m = D(x, p.t) at the predicted x (x itself when no corrector
        is due)."""
        st = state if state is not None else UniPCState()
        if st.pending is None or not self.corrector:
            return x
        pend = st.pending
        return _update(pend.x, pend.start, p, st.ms, st.lams, pend.order, VARIANTS[self.variant], m_new=m)

    def predict(self, x, p: Point, q: Point, m, state):
        """Store m as the model output at ``p`` and take the UniP step from the (corrected) x to ``q``; into
        sigma = 0 return m. Returns (x_next, state)."""
        st = state if state is not None else UniPCState()
        variant = VARIANTS[self.variant]
        ms, lams = (st.ms + (m,))[-self.order :], (st.lams + (p.lam,))[-self.order :]
        left = None if st.steps_left is None else st.steps_left - 1
        if q.sigma == 0:
            return m, UniPCState(ms, lams, None, left)
        order = min(self.order, len(ms))
        if st.steps_left is not None:
            order = min(order, st.steps_left)
        x_next = _update(x, p, q, ms, lams, order, variant)
        return x_next, UniPCState(ms, lams, Pending(x, p, order), left)
