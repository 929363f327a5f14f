"""Samplers for absorbing diffusion as pure steps over one loop, with RADD's cache (Ou et al., ICLR 2025, Sec. 5).

On the grid t_k = linspace(1, t_end, N + 1), each masked token is unmasked on step k with a probability that
does not depend on the network (``TweedieTauLeap``: (m(t) - m(s)) / m(t); ``Euler``: the rate times the step), and
on the last step every remaining mask is filled. A new token is drawn from c_theta(x_t), optionally filtered
(``TopK``, ``TopP``). Because c_theta has no time input, its output changes only when x_t does: the cached
sampler calls the network for a sequence only on a step where one of its tokens is unmasked and the sequence
changed since its last call. Every random number is drawn for the whole batch on every step, so the cached and
uncached samplers give identical samples; a sequence of L tokens costs E-NFE = N (1 - (1 - 1/N)^L) calls
(``expected_nfe``) instead of N. ``sample_ordered`` is the any-order autoregressive sampler (N = L steps, one
position per step, in a given order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from condiff.discrete.denoiser import mask_id
from condiff.discrete.schedules import LogLinear, MaskSchedule, euler_fraction, unmask_fraction
from condiff.errors import ConfigError


class DiscreteStep:
    def fraction(self, schedule: MaskSchedule, t: float, s: float) -> float:
        """The probability that a token masked at t is unmasked on the step to s."""
        raise NotImplementedError


@dataclass(frozen=True)
class TweedieTauLeap(DiscreteStep):
    def fraction(self, schedule, t, s):
        return unmask_fraction(schedule, t, s)


@dataclass(frozen=True)
class Euler(DiscreteStep):
    def fraction(self, schedule, t, s):
        return euler_fraction(schedule, t, s)


class Strategy:
    def __call__(self, logp: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Direct(Strategy):
    def __call__(self, logp):
        return logp


@dataclass(frozen=True)
class TopK(Strategy):
    k: int

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"top-k needs k >= 1, got {self.k}")

    def __call__(self, logp):
        k = min(self.k, logp.shape[-1])
        kth = logp.topk(k, -1).values[..., -1:]
        return logp.masked_fill(logp < kth, -torch.inf)


@dataclass(frozen=True)
class TopP(Strategy):
    p: float

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ConfigError(f"top-p needs 0 < p <= 1, got {self.p}")

    def __call__(self, logp):
        sorted_lp, order = logp.sort(-1, descending=True)
        before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass strictly before each token
        drop_sorted = before >= self.p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return logp.masked_fill(drop, -torch.inf)


@dataclass(frozen=True)
class DiscreteStepInfo:
    i: int
    t: float
    t_next: float
    x: torch.Tensor
    nfe: int  # network rows evaluated so far (sequences times calls)


def expected_nfe(steps: int, length: int) -> float:
    """E-NFE per sequence of the cached sampler: the expected count of distinct steps among ``length`` uniform draws."""
    return steps * (1 - (1 - 1 / steps) ** length)


def _draw(logp: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
    return (logp + gumbel).argmax(-1)


def _gumbel(shape, generator):
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(1e-20, 1 - 1e-12)
    return -torch.log(-torch.log(u))


def _rows(cond, idx):
    return None if cond is None else cond[idx]


def sample(
    denoiser,
    n: int,
    length: int,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    schedule: MaskSchedule = LogLinear(),
    step: DiscreteStep = TweedieTauLeap(),
    strategy: Strategy = Direct(),
    cond: torch.Tensor | None = None,
    cache: bool = True,
    start: torch.Tensor | None = None,
    t_end: float = 1e-5,
    callback: Callable[[DiscreteStepInfo], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Tokens (n, length) and the network rows evaluated. ``start`` fixes some tokens (mask id elsewhere)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    v = denoiser.vocab_size
    m = mask_id(v)
    x = torch.full((n, length), m, dtype=torch.long) if start is None else start.clone()
    if x.shape != (n, length):
        raise ConfigError(f"start must have shape ({n}, {length}), got {tuple(x.shape)}")
    grid = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64).tolist()
    logits = torch.zeros(n, length, v, dtype=torch.float64)
    fresh = torch.zeros(n, dtype=torch.bool)  # the cached logits are those of the current x
    nfe = 0
    for k in range(steps):
        t, s = grid[k], grid[k + 1]
        frac = 1.0 if k == steps - 1 else step.fraction(schedule, t, s)
        u = torch.rand(n, length, generator=generator, dtype=torch.float64)
        gumbel = _gumbel((n, length, v), generator)
        unmask = (x == m) & (u < frac)
        if cache:
            need = unmask.any(1) & ~fresh
        else:
            need = torch.ones(n, dtype=torch.bool)
        idx = need.nonzero().squeeze(1)
        if len(idx):
            logits[idx] = strategy(denoiser(x[idx], _rows(cond, idx))).double()
            fresh[idx] = True
            nfe += len(idx)
        x = torch.where(unmask, _draw(logits, gumbel), x)
        fresh &= ~unmask.any(1)
        if callback is not None:
            callback(DiscreteStepInfo(k, t, s, x, nfe))
    return x, nfe


def sample_ordered(
    denoiser,
    n: int,
    length: int,
    *,
    order: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    strategy: Strategy = Direct(),
    cond: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Any-order autoregressive sampling: one position per step in ``order`` (left to right by default)."""
    v = denoiser.vocab_size
    m = mask_id(v)
    x = torch.full((n, length), m, dtype=torch.long) if start is None else start.clone()
    order = torch.arange(length) if order is None else order
    if sorted(order.tolist()) != list(range(length)):
        raise ConfigError(f"order must be a permutation of 0..{length - 1}, got {order.tolist()}")
    nfe = 0
    for i in order.tolist():
        gumbel = _gumbel((n, v), generator)
        todo = (x[:, i] == m).nonzero().squeeze(1)
        if len(todo):
            logp = strategy(denoiser(x[todo], _rows(cond, todo))[:, i]).double()
            x[todo, i] = _draw(logp, gumbel[todo])
            nfe += len(todo)
    return x, nfe
