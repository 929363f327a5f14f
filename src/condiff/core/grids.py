"""Time grids: float64, strictly descending, from a start time down to an end time.

Spacings are objects (``UniformT``, ``UniformLogSNR``, ``Karras``; ``Trailing``, diffusers' spacing, which does
not end at t_end; and ``Tabulated``: grids read from a file, e.g. searched on a model by
condiff.solvers.grid_search). ``make_grid`` returns ``steps + 1`` points: ``steps``
spaced points from ``t_start`` to ``t_end`` and then, with ``final_zero=True``, the schedule's clean point
(sigma = 0), so the last step returns the denoised estimate, as samplers usually do.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from condiff.core.schedules import NoiseSchedule
from condiff.errors import ConfigError


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class UniformT:
    """Equal steps in t (diffusers' 'linspace' spacing)."""

    name = "uniform-t"

    def points(self, schedule: NoiseSchedule, t_start: float, t_end: float, n: int) -> torch.Tensor:
        return torch.linspace(t_start, t_end, n, dtype=torch.float64)


@dataclass(frozen=True)
class UniformLogSNR:
    """Equal steps in log-SNR (DPM-Solver's 'logSNR' skip type, Lu et al. 2022 sec. 3.3)."""

    name = "uniform-logsnr"

    def points(self, schedule, t_start, t_end, n):
        lo, hi = schedule.log_snr(t_start), schedule.log_snr(t_end)
        return schedule.t_from_log_snr(torch.linspace(float(lo), float(hi), n, dtype=torch.float64))


@dataclass(frozen=True)
class Karras:
    """Karras et al. 2022 eq. 5: sigma/alpha spaced uniformly in its 1/rho power (rho = 7)."""

    rho: float = 7.0
    name = "karras"

    def __post_init__(self):
        if not _is_real(self.rho) or not 0 < self.rho <= 1e3:
            raise ConfigError(f"Karras rho must be a number in (0, 1000], got {self.rho!r}")

    def points(self, schedule, t_start, t_end, n):
        s_max = float(schedule.sigma_over_alpha(t_start))
        s_min = float(schedule.sigma_over_alpha(t_end))
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        inv = 1.0 / self.rho
        ratio = (s_max**inv + ramp * (s_min**inv - s_max**inv)) ** self.rho
        t = schedule.t_from_log_snr(-2.0 * torch.log(ratio))
        t[-1] = t_end  # remove round-off at the ends; t_start last, so that n = 1 gives [t_start]
        t[0] = t_start
        return t


@dataclass(frozen=True)
class Trailing:
    """diffusers' 'trailing' timestep spacing, continuous: n points ``t_clean + (t_start - t_clean)(1 - k/n)``,
    k = 0 .. n-1, so the last noisy point lies (t_start - t_clean)/n above the clean point rather than at t_end
    (``t_end`` is not used). With ``--t-start max`` on a 1000-step table: 999, 799, ..., 199 for 5 steps, exactly
    diffusers' ``timestep_spacing="trailing"``. At few steps no step is spent between t_min and the clean point,
    as uniform-t's last one is. Not in SPACINGS (those end at t_end); `condiff sample|eval --spacing trailing`
    runs it (with ``--t-start max``: diffusers' grid) and `condiff grid search` starts from it."""

    name = "trailing"

    def points(self, schedule, t_start, t_end, n):
        c = float(schedule.t_clean)
        k = torch.arange(n, dtype=torch.float64)
        return c + (t_start - c) * (n - k) / n  # (n - k) / n, not 1 - k / n: exact where n divides the span


@dataclass(frozen=True, eq=False)
class Tabulated:
    """Given grids, one per step count: ``grids[steps]`` holds the ``steps`` noisy points, descending, that precede
    the clean point. They all start at one time (``t_start``, where ``make_grid`` starts when no start is
    given); ``source`` names them in errors ('--grid "g.json"')."""

    grids: dict
    source: str = "the tabulated grids"
    name = "searched"

    def __post_init__(self):
        if not self.grids:
            raise ConfigError(f"{self.source} holds no grid")
        starts = {float(pts[0]) for pts in self.grids.values()}
        if max(starts) - min(starts) > 1e-9 * max(1.0, max(starts)):
            raise ConfigError(f"{self.source}: its grids must share their first time, got {sorted(starts)}")

    @property
    def t_start(self) -> float:
        return float(next(iter(self.grids.values()))[0])

    def points(self, schedule, t_start, t_end, n):
        if n not in self.grids:
            have = ", ".join(str(k) for k in sorted(self.grids))
            raise ConfigError(f"{self.source} has no grid of {n} steps (it has {have}); use one of those --steps")
        pts = torch.tensor(self.grids[n], dtype=torch.float64)
        if abs(float(pts[0]) - t_start) > 1e-9 * max(1.0, abs(t_start)):
            raise ConfigError(
                f"{self.source} starts at t={float(pts[0]):g}, but this run starts at t={t_start:g}; "
                f"leave --t-start out with a tabulated grid"
            )
        return pts


SPACINGS = {"uniform-t": UniformT(), "uniform-logsnr": UniformLogSNR(), "karras": Karras()}
# The spacings sampling accepts by name (`condiff sample|eval --spacing`): SPACINGS (grids from t_start to t_end)
# and diffusers' trailing spacing, whose last noisy point is not t_end.
SAMPLING_SPACINGS = {**SPACINGS, "trailing": Trailing()}
MAX_STEPS = 100_000


def _time(schedule: NoiseSchedule, value, name: str) -> float:
    """A grid end point: a finite number within [t_clean, t_max] of ``schedule``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    lo, hi = min(schedule.t_clean, schedule.t_min), schedule.t_max
    if not _is_real(value) or not lo <= value <= hi:
        raise ConfigError(
            f"{name} must be a finite number in [{lo}, {hi}] for {type(schedule).__name__}, got {value!r}"
        )
    return float(value)


def make_grid(
    schedule: NoiseSchedule,
    steps: int,
    spacing=UniformT(),
    t_start: float | None = None,
    t_end: float | None = None,
    final_zero: bool = True,
) -> torch.Tensor:
    """A descending float64 grid with ``steps`` transitions."""
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    steps = int(steps)
    if not callable(getattr(spacing, "points", None)):
        names = ", ".join(f"{type(s).__name__}()" for s in SPACINGS.values())
        raise ConfigError(f"spacing must be a spacing object ({names}), got {spacing!r}")
    if t_start is None:  # a tabulated grid starts where it was made; the others at the schedule's default
        t_start = schedule.default_t_start() if not isinstance(spacing, Tabulated) else spacing.t_start
    t_start = _time(schedule, t_start, "t_start")
    t_end = schedule.t_min if t_end is None else _time(schedule, t_end, "t_end")
    if not t_start > t_end:
        raise ConfigError(f"t_start ({t_start}) must be greater than t_end ({t_end})")
    if final_zero and not t_end > schedule.t_clean:
        raise ConfigError(
            f"t_end ({t_end}) must be greater than the clean time {schedule.t_clean} when "
            f"final_zero=True (the grid ends there)"
        )
    if final_zero:
        pts = spacing.points(schedule, t_start, t_end, steps)
        grid = torch.cat([pts, torch.tensor([schedule.t_clean], dtype=torch.float64)])
    else:
        grid = spacing.points(schedule, t_start, t_end, steps + 1)
    if not bool(torch.isfinite(grid).all()) or not bool((grid[1:] < grid[:-1]).all()):
        raise ConfigError(
            f"the {getattr(spacing, 'name', 'custom')} grid of {steps} steps from t_start "
            f"{t_start} to t_end {t_end} is not finite and strictly descending; use fewer steps, "
            f"a wider range, or end points where the log-SNR is finite"
        )
    return grid
