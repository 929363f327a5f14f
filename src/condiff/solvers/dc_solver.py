"""DC-Solver: dynamic compensation of the predictor-corrector misalignment (Zhao, Wang, Zhou & Lu 2024,
"DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation", ECCV; the dynamic
compensation method; the official code wl-zhao/DC-Solver. The paper's
equation numbers could not be checked here, so the equations are written out below).

UniPC (unipc.py) evaluates m_i = D(x~_i, t_i) at the *predicted* sample x~_i, corrects x~_i -> x_i^c with it
and then reuses m_i as if it were the model output at x_i^c (no extra evaluation). The mismatch grows with the
guidance scale. Before the predictor step i -> i+1, DC-Solver replaces the stored m_i by the Lagrange
interpolant through the last K+1 stored outputs, evaluated at a shifted point (K = dc_order):

    tau_i = c_{i-1} + rho_i (c_i - c_{i-1}),
    m_i  <-  sum_{j=0..K} m_{i-j} prod_{k != j} (tau_i - c_{i-k}) / (c_{i-j} - c_{i-k})

where c is the interpolation coordinate of each stored point. rho_i = 1 leaves the sampler unchanged (the
interpolant passes through m_i); here rho_i == 1 skips the interpolation altogether, so rho = 1 reproduces the
base solver bit for bit. As in the official code, the compensated value *replaces* the stored output: the
base's predictor and its next corrector use it, and later interpolations use it as a node. The ratios are
searched per step against a many-step reference trajectory (condiff.solvers.dc_search.search_ratios) or predicted for
unseen
(NFE, CFG) by cascade polynomial regression (condiff.solvers.dc_search.predict_cpr).

Coordinate (``axis``). The paper and both official implementations interpolate in the time variable t
(discrete DDPM steps 0..999 in diffusers, t in [1/N, 1] in the LDM code: affine images of each other, and
Lagrange interpolation is invariant under affine changes of variable, so both equal condiff's VP-discrete
t in [-1, 999]); ``TimeAxis()`` is that choice. condiff's default is ``LambdaAxis()``: lambda = log(alpha/sigma),
the variable UniPC and DPM-Solver++ already treat the model output as a polynomial in, and the same for every
parameterisation of one process (t means sigma on EDM, where a Karras grid spans 80 .. 0.002). Every stored
point has sigma > 0 (the clean point is only ever a step's end), so lambda is finite at every node. docs/solvers.md
has the measured comparison of the two axes.

Bases. ``base`` is the solver being compensated: ``UniPC()`` (bh2, order 2, corrector, lower-order final; the
paper's setting) through its ``correct``/``predict`` halves, or a deterministic predictor-only multistep solver
(``DPMSolverPP2M()``, ``DPMSolverPP3M()``) whose one model output per step is its stored output; those are
run with the compensated output in place of the evaluation (the paper applies DC to other samplers too).

Ratios. ``ratios[i]`` belongs to step i (0-based: the step from grid[i] to grid[i+1]); ``None`` means all 1.
Step 0 has no previous point, so ``ratios[0]`` must be 1. ``init_state(grid)`` checks that there is one ratio
per step.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from condiff.errors import ConfigError, is_real
from condiff.solvers.base import Point, Solver, point
from condiff.solvers.dpmpp_2m import DPMSolverPP2M
from condiff.solvers.dpmpp_3m import DPMSolverPP3M
from condiff.solvers.unipc import UniPC


@dataclass(frozen=True)
class TimeAxis:
    """Interpolate in the schedule's time t (the paper's choice)."""

    name = "t"

    def coord(self, p: Point) -> float:
        return p.t


@dataclass(frozen=True)
class LambdaAxis:
    """Interpolate in lambda = log(alpha/sigma), the half log-SNR."""

    name = "lambda"

    def coord(self, p: Point) -> float:
        return p.lam


AXES = {"t": TimeAxis(), "lambda": LambdaAxis()}
PREDICTOR_ONLY = (DPMSolverPP2M, DPMSolverPP3M)
BASES = {"unipc": UniPC(), "dpmpp-2m": DPMSolverPP2M(), "dpmpp-3m": DPMSolverPP3M()}
MAX_DC_ORDER = 3


def lagrange_weights(coords, tau) -> list:
    """The Lagrange basis weights l_j(tau) for the nodes ``coords`` (floats); tau may be a float or a 0-d tensor
    (for gradients with respect to the ratio)."""
    out = []
    for j, cj in enumerate(coords):
        w = 1.0
        for k, ck in enumerate(coords):
            if k != j:
                w = w * ((tau - ck) / (cj - ck))
        out.append(w)
    return out


def compensate(coords, ms, rho):
    """The interpolant through (coords[j], ms[j]) evaluated at tau = c_{-2} + rho (c_{-1} - c_{-2}) (the last
    two nodes are the previous and the current point). With fewer than 2 nodes, or rho == 1 as a number, the
    current output ms[-1] is returned unchanged."""
    if len(ms) < 2 or (not isinstance(rho, torch.Tensor) and rho == 1):
        return ms[-1]
    tau = coords[-2] + rho * (coords[-1] - coords[-2])
    weights = lagrange_weights(coords, tau)
    out = weights[0] * ms[0]
    for w, m in zip(weights[1:], ms[1:]):
        out = out + w * m
    return out


@dataclass(frozen=True)
class DCState:
    """The base solver's state, the interpolation nodes (coordinates and stored outputs of the latest points,
    oldest first), the index of the next step and the number of steps (None: unknown)."""

    base: Any = None
    coords: tuple[float, ...] = ()
    ms: tuple[torch.Tensor, ...] = ()
    i: int = 0
    steps: int | None = None


@dataclass(frozen=True)
class _PredictorOnly:
    """``correct``/``predict`` halves for a predictor-only multistep solver: no corrector; the predictor is the
    solver's own step with the (compensated) output m in place of the model evaluation."""

    solver: Solver
    schedule: Any

    def correct(self, x, p, m, state):
        return x

    def predict(self, x, p, q, m, state):
        return self.solver.step_from_x0(self.schedule, x, p.t, q.t, m, state, None)


def check_ratios(ratios, what: str = "dc-solver ratios") -> tuple[float, ...]:
    """``ratios`` as a tuple of finite floats whose first entry is 1 (ConfigError otherwise)."""
    if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__"):
        raise ConfigError(f"{what} must be a sequence of numbers (one per step), got {ratios!r}")
    out = tuple(ratios)
    if not out:
        raise ConfigError(f"{what} must hold one number per step, got an empty sequence")
    for i, r in enumerate(out):
        if not is_real(r):
            raise ConfigError(f"{what}: ratio {i} must be a finite number, got {r!r}")
    if float(out[0]) != 1.0:
        raise ConfigError(
            f"{what}: the ratio of step 0 must be 1 (there is no previous point to interpolate from), got {out[0]!r}"
        )
    return tuple(float(r) for r in out)


@dataclass(frozen=True)
class DCSolver(Solver):
    """Dynamic compensation over ``base`` (UniPC() by default; also DPMSolverPP2M(), DPMSolverPP3M())."""

    ratios: tuple[float, ...] | None = None
    dc_order: int = 2
    base: Solver = UniPC()
    axis: Any = LambdaAxis()
    name = "dc-solver"

    def __post_init__(self):
        if self.ratios is not None:
            object.__setattr__(self, "ratios", check_ratios(self.ratios))
        if (
            isinstance(self.dc_order, bool)
            or not isinstance(self.dc_order, numbers.Integral)
            or not 1 <= self.dc_order <= MAX_DC_ORDER
        ):
            raise ConfigError(f"dc-solver dc_order must be an integer in [1, {MAX_DC_ORDER}], got {self.dc_order!r}")
        if not isinstance(self.base, (UniPC,) + PREDICTOR_ONLY):
            raise ConfigError(
                f"dc-solver base must be UniPC(...), DPMSolverPP2M() or DPMSolverPP3M(), got {self.base!r}"
            )
        if not callable(getattr(self.axis, "coord", None)):
            raise ConfigError(f"dc-solver axis must be TimeAxis() or LambdaAxis(), got {self.axis!r}")

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.base.order

    @property
    def convergence_order(self) -> int:
        return self.base.convergence_order

    def init_state(self, grid=None):
        if grid is None:
            return None
        steps = len(grid) - 1
        if self.ratios is not None and len(self.ratios) != steps:
            raise ConfigError(
                f"dc-solver has {len(self.ratios)} ratios but the grid has {steps} steps; give one "
                f"ratio per step (search them for this NFE, or predict them with CPR)"
            )
        return DCState(base=self.base.init_state(grid), steps=steps)

    def ratio(self, i: int) -> float:
        if self.ratios is None:
            return 1.0
        if i >= len(self.ratios):
            raise ConfigError(f"dc-solver has {len(self.ratios)} ratios but is asked for step {i + 1}")
        return self.ratios[i]

    def halves(self, schedule):
        """The base's ``correct``/``predict`` halves."""
        return self.base if isinstance(self.base, UniPC) else _PredictorOnly(self.base, schedule)

    def step_from_x0(self, schedule, x, t, t_next, m, state, noise):
        st = state if state is not None else DCState()
        p, q = point(schedule, t), point(schedule, t_next)
        x_c, nodes = absorb(self, schedule, x, p, m, st)
        return advance(self, schedule, x_c, p, q, nodes, st, self.ratio(st.i))


def absorb(solver: DCSolver, schedule, x, p: Point, m, state: DCState):
    """First half of a DC step, after the evaluation m = D(x, p.t): the base's corrector (x -> x_c) and the
    interpolation nodes with m appended (the latest dc_order + 1). Returns (x_c, (coords, ms))."""
    x_c = solver.halves(schedule).correct(x, p, m, state.base)
    keep = solver.dc_order + 1
    return x_c, ((state.coords + (solver.axis.coord(p),))[-keep:], (state.ms + (m,))[-keep:])


def advance(solver: DCSolver, schedule, x_c, p: Point, q: Point, nodes, state: DCState, rho):
    """Second half: compensate the current output with ratio ``rho`` (a float, or a 0-d tensor when searching
    it), store it in place of m and take the base's predictor from x_c to q. Returns (x_next, state)."""
    coords, ms = nodes
    m_dc = compensate(coords, ms, rho)
    x_next, base_state = solver.halves(schedule).predict(x_c, p, q, m_dc, state.base)
    return x_next, DCState(base_state, coords, ms[:-1] + (m_dc,), state.i + 1, state.steps)


def has_corrector(solver: DCSolver) -> bool:
    """Whether the base corrects each step with the next evaluation (UniPC with its corrector on)."""
    return isinstance(solver.base, UniPC) and solver.base.corrector
