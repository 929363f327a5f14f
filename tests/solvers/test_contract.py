"""The contract every solver in condiff.solvers.SOLVERS keeps, checked on the exact GMM denoiser."""

import dataclasses

import pytest
import torch

from condiff.core.grids import UniformLogSNR, make_grid
from condiff.core.sampling import Gaussian, Recorded, initial_noise, sample
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear
from condiff.solvers import DDIM, DDPM, SOLVERS, Euler, get_solver
from noisekit import SlicedNoise

F64 = torch.float64
SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.from_betas("squaredcos_cap_v2"), EDM(), Flow()]
STEPS = 6
# Evaluations a solver skips on the step into sigma = 0 (it returns the denoised estimate instead):
# Heun's correction would divide by rho = 0, so it takes one Euler step (1 eval of its 2).
# DPM-Solver++(2S) returns D(x, t) there without its midpoint evaluation (1 of 2).
SKIPPED_AT_ZERO = {
    "ddpm": 0,
    "ddim": 0,
    "euler": 0,
    "heun": 1,
    "dpmpp-2m": 0,
    "dpmpp-3m": 0,
    "dpmpp-2s": 1,
    "unipc": 0,
    "edm-heun": 1,
    "edm-sde": 1,
    "dc-solver": 0,
    "dpm-v3": 0,
}


def start(schedule, n=16, seed=0, requires_grad=False):
    grid = make_grid(schedule, STEPS, UniformLogSNR())
    x = initial_noise(schedule, float(grid[0]), (n, 2), torch.Generator().manual_seed(seed), dtype=F64)
    return grid, x.requires_grad_(requires_grad)


def run(gmm, name, schedule, grid, x, noise_seed=1, **kw):
    return sample(
        gmm.denoiser(schedule),
        get_solver(name),
        grid,
        x,
        {"y": torch.arange(x.shape[0]) % 2},
        noise=Gaussian(torch.Generator().manual_seed(noise_seed)),
        **kw,
    )


def test_registry_covers_every_solver():
    assert set(SKIPPED_AT_ZERO) == set(SOLVERS)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_finite_shape_and_nfe(gmm, name, schedule):
    solver = get_solver(name)
    grid, x = start(schedule)
    out = run(gmm, name, schedule, grid, x)
    assert out.x.shape == x.shape and out.x.dtype == x.dtype
    assert bool(torch.isfinite(out.x).all())
    assert out.nfe == solver.evals_per_step() * STEPS - SKIPPED_AT_ZERO[name]
    noisy = make_grid(schedule, STEPS, UniformLogSNR(), final_zero=False)
    assert run(gmm, name, schedule, noisy, x).nfe == solver.evals_per_step() * STEPS


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_step_into_clean_point_returns_the_denoised_estimate(gmm, name):
    sch = VPLinear()
    grid, x = start(sch)
    seen = []
    out = run(gmm, name, sch, grid, x, callbacks=[seen.append])
    last = seen[-1]
    assert last.t_next == sch.t_clean and torch.equal(last.x, out.x)
    assert torch.allclose(out.x, last.x0_hat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_gradients_flow_through_sample(gmm, name):
    sch = VPLinear()
    grid, x = start(sch, requires_grad=True)
    out = run(gmm, name, sch, grid, x)
    (grad,) = torch.autograd.grad(out.x.square().sum(), x)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_same_seed_same_output(gmm, name):
    sch = VPLinear()
    grid, x = start(sch)
    a = run(gmm, name, sch, grid, x.clone(), noise_seed=3).x
    b = run(gmm, name, sch, grid, x.clone(), noise_seed=3).x
    assert torch.equal(a, b)
    if get_solver(name).stochastic:
        assert not torch.equal(a, run(gmm, name, sch, grid, x.clone(), noise_seed=4).x)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_are_frozen_and_state_starts_empty(name):
    solver = get_solver(name)
    fields = dataclasses.fields(solver)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(solver, fields[0].name if fields else "order", 0)
    assert solver.init_state() is None


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
def test_ddpm_equals_ddim_eta1_with_the_same_noise(gmm, schedule):
    grid, x = start(schedule)
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(x.shape, generator=g, dtype=F64) for _ in range(STEPS - 1)]
    den = gmm.denoiser(schedule)
    a = sample(den, DDPM(), grid, x, noise=Recorded(noises))
    b = sample(den, DDIM(eta=1.0), grid, x, noise=Recorded(noises))
    assert torch.allclose(a.x, b.x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_euler_equals_deterministic_ddim(gmm, schedule):
    grid, x = start(schedule)
    den = gmm.denoiser(schedule)
    a = sample(den, Euler(), grid, x).x
    b = sample(den, DDIM(eta=0.0), grid, x).x
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def _draws(shape, count=2 * STEPS + 2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(count)]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_batch_elements_are_independent(gmm, name):
    """Sample i of a batch run equals the same sample run inside a different batch (same start, same noise)."""
    sch = VPLinear()
    grid, x = start(sch, n=12)
    y = torch.arange(12) % 2
    draws = _draws(x.shape)
    den, solver = gmm.denoiser(sch), get_solver(name)
    full = sample(den, solver, grid, x, {"y": y}, noise=SlicedNoise(draws, slice(None))).x
    rows = torch.tensor([7, 2, 9])
    part = sample(den, solver, grid, x[rows], {"y": y[rows]}, noise=SlicedNoise(draws, rows)).x
    assert torch.allclose(part, full[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_callback_once_per_step_in_order(gmm, name):
    sch = VPLinear()
    grid, x = start(sch)
    seen = []
    run(gmm, name, sch, grid, x, callbacks=[seen.append])
    assert [s.i for s in seen] == list(range(STEPS))
    assert [s.t for s in seen] == grid[:-1].tolist() and [s.t_next for s in seen] == grid[1:].tolist()


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_no_state_leaks_between_calls(gmm, name):
    """A run after an unrelated run (other start, other grid, other condition) equals a fresh run."""
    sch = VPLinear()
    grid, x = start(sch, seed=0)
    solver, den = get_solver(name), gmm.denoiser(sch)

    def go(g, x0, y):
        return sample(den, solver, g, x0, {"y": y}, noise=Gaussian(torch.Generator().manual_seed(1))).x

    y = torch.arange(x.shape[0]) % 2
    first = go(grid, x.clone(), y)
    go(make_grid(sch, STEPS + 3, UniformLogSNR()), start(sch, seed=1)[1], 1 - y)
    assert torch.equal(first, go(grid, x.clone(), y))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_float32_in_float32_out(gmm, name):
    sch = VPLinear()
    grid, x = start(sch)
    out = run(gmm, name, sch, grid, x.float())
    assert out.x.dtype == torch.float32 and out.x.shape == x.shape and bool(torch.isfinite(out.x).all())


class Given:
    """A denoiser that returns the estimate it was handed (``value``), whatever it is asked."""

    def __init__(self, schedule):
        self.schedule, self.value = schedule, None

    def __call__(self, x, t):
        return self.value


ONE_EVAL = sorted(n for n in SOLVERS if get_solver(n).evals_per_step() == 1)
TWO_EVAL = sorted(set(SOLVERS) - set(ONE_EVAL))


def test_the_one_and_two_evaluation_solvers():
    assert set(TWO_EVAL) == {"heun", "dpmpp-2s", "edm-heun", "edm-sde"}


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("name", ONE_EVAL + ["dc-solver-ratios"])
def test_step_from_x0_equals_step_with_a_denoiser_returning_that_x0(gmm, name, schedule):
    """Over whole trajectories (multistep state carried, the step into sigma = 0 included), step_from_x0 with
    a given x0_hat equals step with a denoiser that returns that x0_hat, bit for bit, for every one-evaluation
    solver; the x0_hat fed in is the model's estimate perturbed per step, so it is no denoiser's output."""
    from condiff.solvers import DCSolver

    solver = DCSolver(ratios=(1.0, 1.0, 0.9, 1.1, 1.05, 1.0)) if name == "dc-solver-ratios" else get_solver(name)
    grid, x = start(schedule)
    den, cond = gmm.denoiser(schedule), {"y": torch.arange(x.shape[0]) % 2}
    given = Given(schedule)
    g = torch.Generator().manual_seed(4)
    xa, sa, xb, sb = x, solver.init_state(grid), x, solver.init_state(grid)
    na, nb = Gaussian(torch.Generator().manual_seed(2)), Gaussian(torch.Generator().manual_seed(2))
    for i in range(STEPS):
        t, tn = float(grid[i]), float(grid[i + 1])
        given.value = den(xa, t, cond) + 0.01 * torch.randn(x.shape, generator=g, dtype=F64)
        xa, sa = solver.step(given, xa, t, tn, sa, na)
        xb, sb = solver.step_from_x0(schedule, xb, t, tn, given.value, sb, nb)
        assert torch.equal(xa, xb), (name, i)


@pytest.mark.parametrize("name", ONE_EVAL)
def test_step_is_step_from_x0_of_the_denoiser_output(gmm, name):
    """A whole sample() run equals the loop of step_from_x0 over the denoiser's own estimates, bit for bit."""
    sch = VPLinear()
    grid, x = start(sch)
    den, cond = gmm.denoiser(sch), {"y": torch.arange(x.shape[0]) % 2}
    solver = get_solver(name)
    ref = run(gmm, name, sch, grid, x).x
    state, noise = solver.init_state(grid), Gaussian(torch.Generator().manual_seed(1))
    for i in range(STEPS):
        t, tn = float(grid[i]), float(grid[i + 1])
        x, state = solver.step_from_x0(sch, x, t, tn, den(x, t, cond), state, noise)
    assert torch.equal(x, ref)


@pytest.mark.parametrize("name", TWO_EVAL)
def test_two_evaluation_solvers_refuse_step_from_x0(gmm, name):
    """A solver that evaluates the denoiser twice a step has no step from one given x0: a one-line ConfigError."""
    from condiff.errors import ConfigError

    sch = VPLinear()
    grid, x = start(sch)
    solver = get_solver(name)
    with pytest.raises(ConfigError, match="2 times a step") as info:
        solver.step_from_x0(sch, x, float(grid[0]), float(grid[1]), x, solver.init_state(grid), None)
    assert "\n" not in str(info.value)
