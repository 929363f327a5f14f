"""One sampling loop for every solver.

``sample`` runs ``solver.step`` over a descending grid, counts network evaluations, calls callbacks with a
frozen StepInfo after every step, draws noise from a NoiseSource and checks that x stays finite. It does not
wrap anything in ``no_grad``: the caller decides (reward fine-tuning backpropagates through it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from condiff.core.denoiser import check_batch, start_trajectory
from condiff.core.schedules import grid_times
from condiff.errors import ConfigError, NonFiniteError


class NoiseSource:
    def sample(self, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Gaussian(NoiseSource):
    """Fresh N(0, I) draws from a torch.Generator (seeded for reproducibility)."""

    generator: torch.Generator | None = None

    def sample(self, like):
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)


@dataclass
class Recorded(NoiseSource):
    """Replays a list of noise tensors in order (edit-friendly DDPM inversion records them)."""

    noises: Sequence[torch.Tensor]
    position: int = 0

    def sample(self, like):
        if self.position >= len(self.noises):
            raise ConfigError(f"recorded noise exhausted after {len(self.noises)} draws")
        z = self.noises[self.position]
        self.position += 1
        return z.to(like)


@dataclass(frozen=True)
class StepInfo:
    i: int
    t: float
    t_next: float
    x: torch.Tensor
    x0_hat: torch.Tensor | None
    nfe: int


@dataclass
class CountingDenoiser:
    """Binds the condition, counts calls and remembers the latest x0_hat."""

    denoiser: Any
    cond: Mapping[str, Any] | None
    nfe: int = 0
    last: torch.Tensor | None = None

    @property
    def schedule(self):
        return self.denoiser.schedule

    def __call__(self, x, t):
        self.nfe += 1
        self.last = self.denoiser(x, t, self.cond)
        return self.last


@dataclass(frozen=True)
class SampleOutput:
    """The final x, the number of denoiser calls, and the per-trajectory denoiser the run used
    (``start_trajectory(denoiser)``: for adaptive guidance its switch state is ``denoiser.state``)."""

    x: torch.Tensor
    nfe: int
    denoiser: Any = field(default=None, repr=False, compare=False)


def all_finite(x: torch.Tensor) -> bool:
    """Whether x has no NaN and no infinity: one reduction (``torch.aminmax``, through which NaN propagates)
    rather than ``isfinite(x).all()``'s boolean copy of x and second pass (about 9x faster on a 64-sample batch)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.detach())
    return math.isfinite(lo) and math.isfinite(hi)


def initial_noise(schedule, t_start: float, shape, generator=None, dtype=torch.float32) -> torch.Tensor:
    """x_T = sigma(t_start) * N(0, I), the noise-dominated prior at the first grid time."""
    sig = float(schedule.sigma(torch.tensor(float(t_start), dtype=torch.float64)))
    return sig * torch.randn(shape, generator=generator, dtype=dtype)


def sample(
    denoiser,
    solver,
    grid: torch.Tensor,
    x: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    noise: NoiseSource | None = None,
    callbacks: Iterable[Callable[[StepInfo], None]] = (),
    progress: bool | str = False,
    check_finite: bool = True,
) -> SampleOutput:
    """Integrate from grid[0] to grid[-1] with ``solver``; returns the final x and the NFE count. The denoiser
    is started once per call (``start_trajectory``), so a method with per-trajectory state begins afresh.
    ``x`` must be a floating-point tensor with a batch dimension (``check_batch``); the denoiser checks the rest
    (a ``WrappedDenoiser``: channels and dtype; guidance: one condition row per sample)."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2 or not bool(torch.all(grid[1:] < grid[:-1])):
        raise ConfigError("grid must be a 1-D, strictly descending tensor with at least 2 points")
    check_batch(x)
    D = CountingDenoiser(start_trajectory(denoiser), cond)
    schedule = getattr(D.denoiser, "schedule", None)
    times = grid.tolist() if schedule is None else grid_times(schedule, grid)  # alpha, sigma once per grid time
    noise = noise or Gaussian()
    state = solver.init_state(grid)
    callbacks = list(callbacks)
    steps = range(grid.numel() - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=progress if isinstance(progress, str) else solver.name, leave=False)
    for i in steps:
        t, t_next = times[i], times[i + 1]
        x, state = solver.step(D, x, t, t_next, state, noise)
        if check_finite and not all_finite(x):
            raise NonFiniteError(
                f"non-finite values in x after step {i} (t={t:.4g} -> {t_next:.4g}) of solver {solver.name!r}"
            )
        if callbacks:
            info = StepInfo(i, float(t), float(t_next), x, D.last, D.nfe)
            for cb in callbacks:
                cb(info)
    return SampleOutput(x, D.nfe, D.denoiser)
