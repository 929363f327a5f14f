"""Noise schedules: log-SNR <-> t round trips, the diffusers tables, finiteness, exact integer steps, grids."""

import math

import pytest
import torch

from condiff.core.grids import SPACINGS, make_grid
from condiff.core.schedules import (
    DEFAULT_START_SIGMA_RATIO,
    EDM,
    Flow,
    VPCosine,
    VPDiscrete,
    VPLinear,
    schedule_from_config,
)
from condiff.errors import ConfigError

F64 = torch.float64

SCHEDULES = {
    "vp-linear": VPLinear(),
    "vp-cosine": VPCosine(),
    "vp-discrete-linear": VPDiscrete.from_betas("linear"),
    "vp-discrete-cos": VPDiscrete.from_betas("squaredcos_cap_v2"),
    "edm": EDM(),
    "flow": Flow(),
}


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]


def dense(schedule, n=2001):
    return torch.linspace(schedule.t_min, schedule.t_max, n, dtype=F64)


def test_t_log_snr_round_trip(schedule):
    t = dense(schedule)
    back = schedule.t_from_log_snr(schedule.log_snr(t))
    assert back.dtype == F64
    assert float((back - t).abs().max()) <= 1e-9


def test_log_snr_t_round_trip(schedule):
    lam = torch.linspace(
        float(schedule.log_snr(schedule.t_max)), float(schedule.log_snr(schedule.t_min)), 2001, dtype=F64
    )
    back = schedule.log_snr(schedule.t_from_log_snr(lam))
    assert float((back - lam).abs().max()) <= 1e-9


def test_half_log_snr_and_monotone(schedule):
    t = dense(schedule)
    lam = schedule.log_snr(t)
    assert torch.equal(schedule.half_log_snr(t), 0.5 * lam)
    assert bool((lam[1:] < lam[:-1]).all())
    ref = 2 * (torch.log(schedule.alpha(t)) - torch.log(schedule.sigma(t)))
    assert torch.allclose(lam, ref, rtol=0, atol=1e-9)


def test_finite_over_range_and_default_grids(schedule):
    t = dense(schedule)
    for f in (schedule.alpha, schedule.sigma, schedule.log_snr):
        assert bool(torch.isfinite(f(t)).all())
    assert bool((schedule.alpha(t) > 0).all()) and bool((schedule.sigma(t) > 0).all())
    for spacing in SPACINGS.values():
        grid = make_grid(schedule, 50, spacing)
        noisy = grid[:-1]
        for f in (schedule.alpha, schedule.sigma, schedule.log_snr, schedule.sigma_over_alpha):
            assert bool(torch.isfinite(f(noisy)).all())
        assert float(schedule.sigma_over_alpha(grid[0])) <= DEFAULT_START_SIGMA_RATIO * (1 + 1e-9)


def test_clean_point(schedule):
    t0 = torch.tensor(schedule.t_clean, dtype=F64)
    assert float(schedule.alpha(t0)) == 1.0
    assert float(schedule.sigma(t0)) == 0.0
    assert float(schedule.log_snr(t0)) == math.inf


@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine", "vp-discrete-linear", "vp-discrete-cos"])
def test_variance_preserving(name):
    sch = SCHEDULES[name]
    t = dense(sch)
    assert sch.variance_preserving
    assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
def test_from_betas_matches_diffusers(kind):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind).alphas_cumprod.double()
    ours = VPDiscrete.from_betas(kind, 1000).alphas_cumprod
    assert ours.dtype == F64 and ours.shape == ref.shape
    assert float((ours - ref).abs().max()) <= 1e-6


@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
def test_vp_discrete_integer_t_is_the_table(kind):
    sch = VPDiscrete.from_betas(kind, 1000)
    ac = sch.alphas_cumprod
    t = torch.arange(1000, dtype=F64)
    assert torch.equal(sch.log_alpha(t), 0.5 * torch.log(ac))
    assert torch.allclose(sch.alpha(t) ** 2, ac, rtol=1e-14, atol=0)
    assert torch.allclose(sch.sigma(t) ** 2, 1 - ac, rtol=1e-12, atol=0)
    assert (sch.t_clean, sch.t_min, sch.t_max) == (-1.0, 0.0, 999.0)


def test_vp_discrete_interpolates_log_alpha_linearly():
    sch = VPDiscrete.from_betas("linear", 1000)
    la = sch.log_alpha(torch.tensor([10.0, 10.25, 11.0], dtype=F64))
    assert torch.allclose(la[1], 0.75 * la[0] + 0.25 * la[2], rtol=1e-15, atol=0)


def test_vp_discrete_repr_is_one_short_line():
    """Not the table's 1000 values."""
    assert repr(VPDiscrete.from_betas("squaredcos_cap_v2")) == "VPDiscrete(T=1000, t in [-1, 999])"
    assert repr(VPDiscrete.from_betas(num_steps=10)) == "VPDiscrete(T=10, t in [-1, 9])"


def test_vp_discrete_rejects_bad_tables():
    with pytest.raises(ConfigError):
        VPDiscrete(alphas_cumprod=torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ConfigError):
        VPDiscrete(alphas_cumprod=torch.tensor([1.0, 0.5]))
    with pytest.raises(ConfigError):
        VPDiscrete.from_betas("cubic")


def test_config_round_trip(schedule):
    back = schedule_from_config(schedule.to_config())
    t = dense(back, 101)
    assert torch.allclose(back.log_snr(t), schedule.log_snr(t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("spacing", sorted(SPACINGS))
def test_grids_strictly_descending(schedule, spacing, steps, final_zero):
    t_start = schedule.default_t_start()
    grid = make_grid(schedule, steps, SPACINGS[spacing], final_zero=final_zero)
    assert grid.dtype == F64 and grid.shape == (steps + 1,)
    assert bool((grid[1:] < grid[:-1]).all())
    assert float(grid[0]) == pytest.approx(t_start, rel=1e-12, abs=1e-12)
    if final_zero:
        assert float(grid[-1]) == schedule.t_clean
        if steps > 1:
            assert float(grid[-2]) == pytest.approx(schedule.t_min, rel=1e-12, abs=1e-12)
    else:
        assert float(grid[-1]) == pytest.approx(schedule.t_min, rel=1e-12, abs=1e-12)


def test_uniform_log_snr_is_uniform(schedule):
    grid = make_grid(schedule, 20, SPACINGS["uniform-logsnr"], final_zero=False)
    steps = schedule.log_snr(grid).diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-8, atol=0)


def test_grid_rejects_bad_arguments():
    sch = VPLinear()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError):
            make_grid(sch, bad)
    with pytest.raises(ConfigError):
        make_grid(sch, 10, t_start=0.1, t_end=0.5)
