"""Universal guidance (Bansal et al. 2023, "Universal Guidance for Diffusion Models", sec. 3, eqs. 6-9 and
Algorithm 1) as a Denoiser -> Denoiser object, and self-recurrence as a solver wrapper.

Any differentiable loss l(x0_hat, cond) (one value per sample, to minimise) steers the clean estimate.

* Forward guidance (eq. 6): eps' = eps + s(t) sigma_t grad_{x_t} l(x0_hat(x_t)). With x0 = (x - sigma eps)/alpha
  this is, in the x0 space that solvers consume,

      x0' = x0_hat - s(t) (sigma_t^2 / alpha_t) grad_{x_t} l(x0_hat(x_t)),

  i.e. classifier guidance (classifier.py) with log p = -l, the gradient taken through the denoiser.
  Several forward terms act at once: the gradient of sum_i s_i l_i (one backward pass) = the sum of the
  single-term corrections.
* Backward guidance (eqs. 7-8): Delta* = argmin_Delta l(x0' + Delta) by ``steps`` plain gradient steps of
  size ``lr`` from Delta = 0, then eps' <- eps' - sqrt(alpha^2/sigma^2) Delta*, i.e. x0'' = x0' + Delta*.
  Several backward terms minimise the sum of their losses jointly. Backward terms act after forward terms.
* Self-recurrence (Algorithm 1, the k loop): ``SelfRecurrence(solver, k)`` runs a solver step t -> s, re-noises
  the result back to t with the forward kernel q(x_t | x_s),

      x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) z,

  and repeats, k steps in all; the k-th result is returned. It is a Solver wrapper (not part of the
  denoiser) because it re-runs whole steps; every repeat starts from the solver state given to the step and
  the last repeat's state is kept, so multistep solvers see one history entry per grid step. The re-noising
  variance is the schedule's sigma_{t|s}^2 (Steered Diffusion's code adds beta_t z; the sqrt(beta_t) z used
  here is the forward kernel, and leaves p_t invariant when the step is exact).

The guidance gradient is taken at a detached copy of x and returned detached (no graph back to x), as in
classifier.py. A scale of 0 (and no backward terms) returns the wrapped denoiser's output untouched.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from condiff.core.denoiser import Wrapper, coefficients
from condiff.errors import ConfigError
from condiff.guidance.schedules import check_scale
from condiff.solvers.base import Solver, point


def _check_loss(loss):
    if not callable(loss):
        raise ConfigError(f"a guidance loss must be a callable loss(x0, cond) -> (B,), got {loss!r}")


def _evaluate(loss, x0, cond, batch):
    v = loss(x0, cond)
    if v.shape != (batch,):
        raise ConfigError(f"a guidance loss must return one value per sample, shape ({batch},), got {tuple(v.shape)}")
    return v


@dataclass(frozen=True)
class Forward:
    """Forward guidance term: x0 -= scale(t) (sigma^2/alpha) grad_x loss(x0_hat(x), cond)."""

    loss: Callable
    scale: float | Callable = 1.0

    def __post_init__(self):
        _check_loss(self.loss)
        check_scale(self.scale)

    def at(self, t) -> float:
        return self.scale(t) if callable(self.scale) else self.scale


@dataclass(frozen=True)
class Backward:
    """Backward guidance term: x0 += argmin_Delta loss(x0 + Delta) by ``steps`` gradient steps of size ``lr``."""

    loss: Callable
    steps: int = 1
    lr: float = 0.1

    def __post_init__(self):
        _check_loss(self.loss)
        if not isinstance(self.steps, numbers.Integral) or isinstance(self.steps, bool) or self.steps < 0:
            raise ConfigError(f"backward guidance steps must be a non-negative integer, got {self.steps!r}")
        if not isinstance(self.lr, numbers.Real) or isinstance(self.lr, bool) or not 0 < self.lr < math.inf:
            raise ConfigError(f"backward guidance lr must be a positive finite number, got {self.lr!r}")


def backward_delta(losses: Sequence[Callable], x0: torch.Tensor, cond, steps: int, lr: float) -> torch.Tensor:
    """Delta after ``steps`` steps Delta <- Delta - lr grad_Delta sum_i loss_i(x0 + Delta, cond), from 0."""
    base = x0.detach()
    delta = torch.zeros_like(base)
    with torch.enable_grad():
        for _ in range(steps):
            d = delta.detach().requires_grad_(True)
            total = sum(_evaluate(f, base + d, cond, base.shape[0]).sum() for f in losses)
            (g,) = torch.autograd.grad(total, d)
            delta = delta - lr * g
    return delta


@dataclass
class UniversalGuidance(Wrapper):
    """Forward and backward guidance terms on the wrapped denoiser's x0_hat (module docstring). The wrapped
    denoiser gets ``cond`` unchanged; each loss gets it too (to read its target)."""

    denoiser: Any
    terms: Sequence[Forward | Backward]

    def __post_init__(self):
        self.terms = list(self.terms) if isinstance(self.terms, (list, tuple)) else [self.terms]
        for term in self.terms:
            if not isinstance(term, (Forward, Backward)):
                raise ConfigError(f"universal guidance terms must be Forward(...) or Backward(...), got {term!r}")
        steps = {b.steps for b in self.terms if isinstance(b, Backward)}
        lrs = {b.lr for b in self.terms if isinstance(b, Backward)}
        if len(steps) > 1 or len(lrs) > 1:
            raise ConfigError(
                f"backward terms are minimised jointly and must share steps and lr, got steps "
                f"{sorted(steps)} and lr {sorted(lrs)}"
            )

    def __call__(self, x, t, cond=None):
        forward = [(f, f.at(t)) for f in self.terms if isinstance(f, Forward)]
        forward = [(f, s) for f, s in forward if s != 0]
        backward = [b for b in self.terms if isinstance(b, Backward) and b.steps > 0]
        if not forward:
            x0 = self.denoiser(x, t, cond)
        else:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                x0g = self.denoiser(xg, t, cond)
                total = sum(s * _evaluate(f.loss, x0g, cond, x.shape[0]).sum() for f, s in forward)
                (grad,) = torch.autograd.grad(total, xg)
            a, sig = coefficients(self.schedule, t, x)
            x0 = x0g.detach() - (sig * sig / a) * grad.to(x0g.dtype)
        if backward:
            x0 = x0 + backward_delta([b.loss for b in backward], x0, cond, backward[0].steps, backward[0].lr)
        return x0


def renoise(schedule, x_s: torch.Tensor, s: float, t: float, z: torch.Tensor) -> torch.Tensor:
    """A draw from the forward kernel q(x_t | x_s) for t > s (VDM eq. 6): alpha_{t|s} x_s + sigma_{t|s} z."""
    p, q = point(schedule, t), point(schedule, s)
    a_ts = p.alpha / q.alpha
    return a_ts * x_s + math.sqrt(max(p.sigma**2 - a_ts**2 * q.sigma**2, 0.0)) * z


@dataclass(frozen=True)
class SelfRecurrence(Solver):
    """Repeat each step of ``solver`` k times, re-noising back to t in between (module docstring)."""

    solver: Solver
    k: int = 1

    def __post_init__(self):
        if not isinstance(self.solver, Solver):
            raise ConfigError(f"self-recurrence wraps a solver object, got {self.solver!r}")
        if not isinstance(self.k, numbers.Integral) or isinstance(self.k, bool) or self.k < 1:
            raise ConfigError(f"self-recurrence k must be a positive integer, got {self.k!r}")

    @property
    def name(self):  # type: ignore[override]
        return f"{self.solver.name}+recurrence{self.k}"

    @property
    def order(self):  # type: ignore[override]
        return self.solver.order

    @property
    def stochastic(self):  # type: ignore[override]
        return self.k > 1 or self.solver.stochastic

    def init_state(self, grid=None):
        return self.solver.init_state(grid)

    def evals_per_step(self) -> int:
        return self.k * self.solver.evals_per_step()

    def step_from_x0(self, schedule, x, t, t_next, x0_hat, state, noise):
        if self.k > 1:
            raise ConfigError(
                f"self-recurrence with k = {self.k} evaluates the denoiser again at every repeat, so it "
                f"cannot step from one given x0_hat"
            )
        return self.solver.step_from_x0(schedule, x, t, t_next, x0_hat, state, noise)

    def step(self, D, x, t, t_next, state, noise):
        x_next, new_state = self.solver.step(D, x, t, t_next, state, noise)
        for _ in range(self.k - 1):
            x = renoise(D.schedule, x_next, t_next, t, noise.sample(x_next))
            x_next, new_state = self.solver.step(D, x, t, t_next, state, noise)
        return x_next, new_state
