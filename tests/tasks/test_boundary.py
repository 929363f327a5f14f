"""Oracles of the shared boundary-condition search (Ma et al., ICLR 2024) on the linear-Gaussian restoration toy
x_0 | y ~ N(A y, S), S = diag(lam): the exact PF-ODE map from (x_T at t_T) is F(x_T, y) = A y + M (x_T - a_T A y),
M = diag(sqrt(lam / (a_T^2 lam + s_T^2))), so a candidate's expected squared error is
tr S + ||M x_T||^2 + a_T^2 tr(M A A^T M) (spec sampling_guidance.md section 13 (d))."""

from __future__ import annotations

import pytest
import torch

from condiff.core.grids import UniformLogSNR, make_grid
from condiff.core.sampling import initial_noise
from condiff.core.schedules import VPCosine, alpha_sigma
from condiff.errors import ConfigError
from condiff.solvers import DDIM, DPMSolverPP2M
from condiff.tasks.boundary import mean_se, quality_of, search_boundary

F64 = torch.float64
D, M_IN = 6, 3
LAM = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1], dtype=F64)
A = torch.linspace(-1, 1, D * M_IN, dtype=F64).reshape(D, M_IN)
STEPS = 200


class GaussianSR:
    """The exact conditional denoiser E[x_0 | x_t, y] of x_0 | y ~ N(A y, diag(LAM))."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, x, t, cond):
        a, s = (float(v) for v in alpha_sigma(self.schedule, torch.as_tensor(float(t), dtype=F64)))
        mu = cond["y"] @ A.T
        return mu + LAM * a / (a * a * LAM + s * s) * (x - a * mu)


def neg_mse(x, target):
    return -(x - target).pow(2).mean(1)


def toy(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, M_IN, generator=g, dtype=F64)
    x0 = y @ A.T + LAM.sqrt() * torch.randn(n, D, generator=g, dtype=F64)
    return y, x0


def setup():
    sch = VPCosine()
    grid = make_grid(sch, STEPS, UniformLogSNR())
    a_T, s_T = (float(v) for v in alpha_sigma(sch, grid[0]))
    m = (LAM / (a_T**2 * LAM + s_T**2)).sqrt()
    return sch, grid, a_T, s_T, m


def exact_map(y, x_T, a_T, m):
    mu = y @ A.T
    return mu + m * (x_T - a_T * mu)


def cond_of(y):
    return {"y": y}


def test_search_scores_are_the_exact_ode_map_scores_and_pick_their_argmax():
    sch, grid, a_T, _, m = setup()
    y, x0 = toy(64, 0)
    cands = initial_noise(sch, float(grid[0]), (12, D), torch.Generator().manual_seed(1), F64)
    res = search_boundary(GaussianSR(sch), DPMSolverPP2M(), grid, cond_of, y, x0, neg_mse, cands, batch=100)
    exact = torch.stack([neg_mse(exact_map(y, c, a_T, m), x0).mean() for c in cands])
    # DPM-Solver++(2M)'s discretisation error at 200 log-SNR-uniform steps is below 1e-4 in x (measured 8e-5),
    # so below 1e-3 on scores of order 1
    torch.testing.assert_close(res.scores, exact, atol=1e-3, rtol=0)
    assert res.index == int(torch.argmax(exact))
    assert torch.equal(res.x_T, cands[res.index])
    assert res.per_pair.shape == (12, 64) and res.nfe == 12 * 64 // 100 * STEPS + STEPS  # 8 chunks of 100 rows


def test_search_picks_the_smallest_weighted_norm_and_transfers_to_unseen_inputs():
    sch, grid, a_T, s_T, m = setup()
    den, solver = GaussianSR(sch), DPMSolverPP2M()
    y, x0 = toy(4000, 2)
    cands = initial_noise(sch, float(grid[0]), (8, D), torch.Generator().manual_seed(3), F64)
    res = search_boundary(den, solver, grid, cond_of, y, x0, neg_mse, cands, batch=4000)
    # the expected error tr S + ||M x||^2 + const is smallest at the candidate of smallest M-weighted norm
    assert res.index == int(torch.argmin((m * cands).pow(2).sum(1)))

    yt, x0t = toy(8000, 4)  # unseen inputs
    searched = -quality_of(den, solver, grid, cond_of, yt, x0t, neg_mse, res.x_T, batch=8000) * D
    starts = initial_noise(sch, float(grid[0]), (8000, D), torch.Generator().manual_seed(5), F64)
    random = -quality_of(den, solver, grid, cond_of, yt, x0t, neg_mse, starts, batch=8000) * D
    const = LAM.sum() + a_T**2 * (m[:, None] * A).pow(2).sum()
    predicted_searched = float(const + (m * res.x_T).pow(2).sum())
    predicted_random = float(const + s_T**2 * m.pow(2).sum())
    mean_s, se_s = mean_se(searched)
    mean_r, se_r = mean_se(random)
    assert abs(mean_s - predicted_searched) < 4 * se_s
    assert abs(mean_r - predicted_random) < 4 * se_r
    # the random start's extra error over x_T = 0 is about tr S; the searched one removes most of it
    assert mean_r - mean_s > 2 * (se_s**2 + se_r**2) ** 0.5
    assert (mean_r - mean_s) > 0.5 * float(LAM.sum())


def test_quality_of_a_shared_start_equals_the_searchs_row():
    sch, grid, *_ = setup()
    y, x0 = toy(10, 6)
    cands = torch.randn(3, D, generator=torch.Generator().manual_seed(7), dtype=F64)
    res = search_boundary(GaussianSR(sch), DPMSolverPP2M(), grid, cond_of, y, x0, neg_mse, cands, batch=7)
    for k in range(3):
        q = quality_of(GaussianSR(sch), DPMSolverPP2M(), grid, cond_of, y, x0, neg_mse, cands[k], batch=4)
        torch.testing.assert_close(q, res.per_pair[k], atol=1e-12, rtol=0)


def test_bad_inputs_are_one_line_errors():
    sch, grid, *_ = setup()
    den = GaussianSR(sch)
    y, x0 = toy(4, 8)
    cands = torch.zeros(2, D, dtype=F64)
    with pytest.raises(ConfigError, match="deterministic solver"):
        search_boundary(den, DDIM(eta=1.0), grid, cond_of, y, x0, neg_mse, cands)
    with pytest.raises(ConfigError, match="one target per input"):
        search_boundary(den, DDIM(), grid, cond_of, y, x0[:3], neg_mse, cands)
    with pytest.raises(ConfigError, match="one score per sample"):
        search_boundary(den, DDIM(), grid, cond_of, y, x0, lambda a, b: neg_mse(a, b).mean(), cands)
    with pytest.raises(ConfigError, match="at least one candidate"):
        search_boundary(den, DDIM(), grid, cond_of, y, x0, neg_mse, cands[:0])
    with pytest.raises(ConfigError, match="shared"):
        quality_of(den, DDIM(), grid, cond_of, y, x0, neg_mse, torch.zeros(3, D, dtype=F64))
    with pytest.raises(ConfigError, match="at least 2"):
        mean_se(torch.ones(1))


def test_mean_se_is_the_sample_standard_error():
    m, se = mean_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and se == pytest.approx((5 / 3) ** 0.5 / 2, abs=1e-12)
