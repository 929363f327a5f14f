"""GridTime: sample's grid times carry alpha and sigma evaluated once, with exactly the values an evaluation at
each use gives; all_finite: the loop's one-reduction finiteness check."""

import copy
import pickle

import pytest
import torch

from condiff.core.denoiser import coefficients
from condiff.core.grids import make_grid
from condiff.core.sampling import CountingDenoiser, all_finite, sample
from condiff.core.schedules import EDM, Flow, GridTime, VPCosine, VPDiscrete, VPLinear, alpha_sigma, grid_times
from condiff.solvers import get_solver
from condiff.solvers.base import point

F64 = torch.float64
SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.from_betas("squaredcos_cap_v2"), EDM(), Flow()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_grid_times_hold_the_evaluated_values(schedule):
    """alpha_sigma equals alpha() and sigma() bit for bit; a GridTime's point and coefficients equal those of the
    plain float; it is a float (arithmetic, copies and pickles give plain floats); another schedule's GridTime is
    evaluated, not read."""
    grid = make_grid(schedule, 7)
    t64 = grid.clone()
    a, s = alpha_sigma(schedule, t64)
    assert torch.equal(a, schedule.alpha(t64)) and torch.equal(s, schedule.sigma(t64))
    x = torch.randn(3, 2)
    for t, gt in zip(grid.tolist(), grid_times(schedule, grid)):
        assert isinstance(gt, float) and gt == t and type(gt + 0.0) is float
        assert type(copy.deepcopy(gt)) is float and type(pickle.loads(pickle.dumps(gt))) is float
        assert point(schedule, gt) == point(schedule, t)
        for dtype in (torch.float32, F64):
            want, got = coefficients(schedule, t, x.to(dtype)), coefficients(schedule, gt, x.to(dtype))
            assert all(w.dtype == g.dtype == dtype and torch.equal(w, g) for w, g in zip(want, got))
    other = GridTime(float(grid[1]), VPLinear(beta_max=10.0))
    assert point(schedule, other) == point(schedule, float(grid[1]))


def test_sample_is_bitwise_the_loop_over_plain_floats(gmm):
    """sample (GridTime times) gives bitwise the samples of the same steps over plain float times."""
    schedule = VPLinear()
    den = gmm.denoiser(schedule)
    grid = make_grid(schedule, 6)
    x = torch.randn(8, gmm.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    for name in ("ddim", "dpmpp-2m", "heun", "unipc"):
        solver = get_solver(name)
        got = sample(den, solver, grid, x).x
        y, state, D = x, solver.init_state(grid), CountingDenoiser(den, None)
        for i in range(6):
            y, state = solver.step(D, y, float(grid[i]), float(grid[i + 1]), state, None)
        assert torch.equal(got, y), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite(dtype):
    x = torch.randn(4, 3, 5).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 1, 3] = bad
        assert not all_finite(y)
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big) and all_finite(-big)
    assert all_finite(torch.randn(5, requires_grad=True))
