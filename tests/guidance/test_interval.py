"""Guidance interval on the exact GMM: CFG inside (t_lo, t_hi], the conditional model outside, bit for bit,
over whole trajectories; per-sample t evaluates the null branch only for the rows inside."""

import math

import pytest
import torch

from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.core.schedules import EDM, VPLinear
from condiff.data.gmm import GMM
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.guidance.adaptive import CountRows
from condiff.guidance.interval import GuidanceInterval, branches
from condiff.guidance.schedules import IntervalScale, LinearScale
from condiff.solvers import get_solver

F64 = torch.float64


def setup(gmm, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, gmm.dim, generator=g, dtype=F64)
    y = torch.randint(0, gmm.num_classes, (n,), generator=g)
    return x, y, {"y": y, "null": GMM.null_cond(n)}


class Reference:
    """CFG when t_lo < t <= t_hi, else the conditional model: the definition, evaluated branch by branch."""

    def __init__(self, inner, w, lo, hi):
        self.inner, self.w, self.lo, self.hi = inner, w, lo, hi

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x, t, cond):
        if self.lo < t <= self.hi:
            return CFG(self.inner, self.w)(x, t, cond)
        return self.inner(x, t, {"y": cond["y"]})


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "heun", "unipc", "ddpm"])
@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
def test_trajectory_is_cfg_inside_and_conditional_outside(gmm, solver, schedule):
    """Whole trajectories equal the branch-by-branch definition bit for bit, and equal CFG with the interval
    given as a scale function (IntervalScale: w inside, 1 outside, where CFG skips the null branch); the null
    branch runs only at evaluations inside the interval (rows counted)."""
    grid = make_grid(schedule, 10)
    lo, hi = float(grid[7]), float(grid[2])
    x, _, cond = setup(gmm)
    x = float(schedule.sigma(grid[0])) * x
    den = gmm.denoiser(schedule)

    def go(d):
        return sample(d, get_solver(solver), grid, x, cond, Gaussian(torch.Generator().manual_seed(3)))

    counted = CountRows(den)
    out = go(GuidanceInterval(counted, 3.0, lo, hi))
    assert torch.equal(out.x, go(Reference(den, 3.0, lo, hi)).x)
    assert torch.equal(out.x, go(CFG(den, IntervalScale(3.0, lo, hi))).x)
    times = []
    go(CountTimes(den, times))
    inside = sum(lo < t <= hi for t in times)
    assert 0 < inside < len(times)
    assert counted.rows == x.shape[0] * (len(times) + inside)


class CountTimes:
    def __init__(self, inner, times):
        self.inner, self.times = inner, times

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x, t, cond):
        self.times.append(float(t))
        return CFG(self.inner, 3.0)(x, t, cond)


def test_single_evaluations_and_half_open_bounds(gmm):
    """At t_hi the guidance is on (CFG exactly), at t_lo it is off (the conditional model exactly, one call of
    n rows with the null entry removed)."""
    x, y, cond = setup(gmm)
    den = gmm.denoiser(VPLinear())
    gi = GuidanceInterval(den, 4.0, 0.2, 0.6)
    assert torch.equal(gi(x, 0.6, cond), CFG(den, 4.0)(x, 0.6, cond))
    assert torch.equal(gi(x, 0.4, cond), CFG(den, 4.0)(x, 0.4, cond))
    assert torch.equal(gi(x, 0.2, cond), den(x, 0.2, {"y": y}))
    assert torch.equal(gi(x, 0.7, cond), den(x, 0.7, {"y": y}))
    counted = CountRows(den)
    GuidanceInterval(counted, 4.0, 0.2, 0.6)(x, 0.1, cond)
    assert counted.calls == 1 and counted.rows == x.shape[0]


def test_per_sample_times_evaluate_the_null_branch_only_inside(gmm):
    """Per-sample t: rows inside get CFG (with their own scale from a schedule), rows outside the conditional
    estimate; the forward has n + (rows inside) rows."""
    x, y, cond = setup(gmm, n=8)
    den = gmm.denoiser(VPLinear())
    t = torch.tensor([0.05, 0.25, 0.35, 0.5, 0.55, 0.65, 0.8, 0.95], dtype=F64)
    scale = LinearScale(5.0, 2.0, 0.6, 0.2)
    counted = CountRows(den)
    out = GuidanceInterval(counted, scale, 0.2, 0.6)(x, t, cond)
    inside = (t > 0.2) & (t <= 0.6)
    w = scale(t)[:, None]
    x0_c, x0_u = den(x, t, {"y": y}), den(x, t)
    assert torch.allclose(out[inside], (x0_u + w * (x0_c - x0_u))[inside], rtol=0, atol=1e-12)
    assert torch.allclose(out[~inside], x0_c[~inside], rtol=0, atol=1e-12)
    assert counted.calls == 1 and counted.rows == 8 + int(inside.sum())


def test_branches_helper_layout(gmm):
    """branches(): [null rows, cond] in one forward; the null rows are those of the mask, in order."""
    x, y, cond = setup(gmm, n=6)
    den = gmm.denoiser(VPLinear())
    null = cond.pop("null")
    rows = torch.tensor([False, True, True, False, True, False])
    x0_c, x0_u = branches(den, x, 0.5, cond, null, rows)
    assert torch.allclose(x0_c, den(x, 0.5, {"y": y}), rtol=0, atol=1e-12)
    assert torch.allclose(x0_u, den(x[rows], 0.5), rtol=0, atol=1e-12)
    x0_c, x0_u = branches(den, x, 0.5, cond, null, torch.zeros(6, dtype=torch.bool))
    assert x0_u.shape[0] == 0 and torch.equal(x0_c, den(x, 0.5, {"y": y}))


def test_errors(gmm):
    den = gmm.denoiser(VPLinear())
    with pytest.raises(ConfigError, match="t_lo < t_hi"):
        GuidanceInterval(den, 3.0, 0.5, 0.5)
    with pytest.raises(ConfigError, match="t_lo"):
        GuidanceInterval(den, 3.0, math.nan, 0.5)
    with pytest.raises(ConfigError, match="scale"):
        GuidanceInterval(den, math.inf, 0.1, 0.5)
    with pytest.raises(ConfigError, match="null"):
        GuidanceInterval(den, 3.0, 0.1, 0.5)(torch.zeros(2, 2, dtype=F64), 0.3, {"y": torch.tensor([0, 1])})
