"""The sampling loop: StepInfo callbacks, recorded noise, non-finite detection, grid validation."""

import dataclasses

import pytest
import torch

from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import Gaussian, NoiseSource, Recorded, initial_noise, sample
from condiff.core.schedules import VPLinear
from condiff.errors import ConfigError, NonFiniteError
from condiff.solvers import DDPM, SOLVERS, get_solver

F64 = torch.float64


class Recording(NoiseSource):
    """Gaussian draws that are also kept, to be replayed with Recorded."""

    def __init__(self, seed):
        self.inner, self.draws = Gaussian(torch.Generator().manual_seed(seed)), []

    def sample(self, like):
        z = self.inner.sample(like)
        self.draws.append(z)
        return z


class NaNAt:
    """A denoiser that returns NaN from its ``call``-th evaluation on."""

    def __init__(self, inner, call):
        self.inner, self.call, self.n = inner, call, 0

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x, t, cond=None):
        self.n += 1
        out = self.inner(x, t, cond)
        return out * float("nan") if self.n > self.call else out


def setup(gmm, steps=5):
    sch = VPLinear()
    grid = make_grid(sch, steps, UniformT())
    x = initial_noise(sch, float(grid[0]), (8, 2), torch.Generator().manual_seed(0), dtype=F64)
    return gmm.denoiser(sch), grid, x


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "ddpm"])
def test_callbacks_receive_step_info(gmm, name):
    den, grid, x = setup(gmm)
    seen = []
    out = sample(
        den,
        get_solver(name),
        grid,
        x,
        noise=Gaussian(torch.Generator().manual_seed(1)),
        callbacks=[seen.append, lambda info: None],
    )
    assert [s.i for s in seen] == list(range(len(grid) - 1))
    assert [s.t for s in seen] == grid[:-1].tolist() and [s.t_next for s in seen] == grid[1:].tolist()
    assert [s.nfe for s in seen] == list(range(1, len(grid)))
    assert seen[-1].x is out.x
    # x0_hat is the denoiser's estimate at the step's start, from the state the step started in
    prev = x
    for s in seen:
        assert torch.allclose(s.x0_hat, den(prev, s.t), rtol=0, atol=0)
        prev = s.x
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0].i = 7


def test_recorded_noise_replays(gmm):
    den, grid, x = setup(gmm)
    rec = Recording(seed=2)
    first = sample(den, DDPM(), grid, x, noise=rec)
    assert len(rec.draws) == len(grid) - 2  # no noise on the step into sigma = 0
    replay = Recorded(rec.draws)
    again = sample(den, DDPM(), grid, x, noise=replay)
    assert torch.equal(first.x, again.x) and replay.position == len(rec.draws)
    with pytest.raises(ConfigError, match="exhausted"):
        sample(den, DDPM(), grid, x, noise=Recorded(rec.draws[:-1]))


@pytest.mark.parametrize("call", [0, 2])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_nan_raises_non_finite_error_naming_step_and_solver(gmm, name, call):
    den, grid, x = setup(gmm)
    solver = get_solver(name)
    step = call // solver.evals_per_step()
    with pytest.raises(NonFiniteError, match=rf"step {step} .*{name!r}"):
        sample(NaNAt(den, call), solver, grid, x, noise=Gaussian(torch.Generator().manual_seed(0)))


def test_check_finite_can_be_turned_off(gmm):
    den, grid, x = setup(gmm)
    out = sample(NaNAt(den, 0), get_solver("ddim"), grid, x, check_finite=False)
    assert bool(torch.isnan(out.x).all())


@pytest.mark.parametrize(
    "grid",
    [
        [0.5, 0.7, 0.0],  # not descending
        [0.5, 0.5, 0.0],  # not strictly descending
        [0.5],  # one point
        [],  # empty
        [[0.9, 0.5], [0.3, 0.0]],  # 2-D
    ],
)
def test_bad_grids_raise_config_error(gmm, grid):
    den, _, x = setup(gmm)
    with pytest.raises(ConfigError):
        sample(den, get_solver("ddim"), torch.tensor(grid, dtype=F64), x)


def test_sample_keeps_gradients_and_does_not_mutate_input(gmm):
    den, grid, x = setup(gmm)
    x0 = x.clone()
    x.requires_grad_(True)
    out = sample(den, get_solver("heun"), grid, x)
    assert out.x.requires_grad
    assert torch.equal(x.detach(), x0)


class Trajectories:
    """A denoiser with per-trajectory state: ``start()`` returns a fresh ``One`` (which counts its calls) and is
    recorded; calling the object itself is an error."""

    def __init__(self, inner):
        self.inner, self.started = inner, []

    @property
    def schedule(self):
        return self.inner.schedule

    def start(self):
        one = One(self.inner)
        self.started.append(one)
        return one

    def __call__(self, x, t, cond=None):
        raise AssertionError("called without start()")


class One:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x, t, cond=None):
        self.calls += 1
        return self.inner(x, t, cond)


@pytest.mark.parametrize("name", ["ddim", "heun", "ddpm"])
def test_sample_starts_the_denoiser_once_per_call(gmm, name):
    """sample() calls start() once per call, runs the whole trajectory on what it returned and hands it back as
    SampleOutput.denoiser; a denoiser without start() is used (and returned) as it is."""
    den, grid, x = setup(gmm)
    stateful = Trajectories(den)
    first = sample(stateful, get_solver(name), grid, x, noise=Gaussian(torch.Generator().manual_seed(0)))
    second = sample(stateful, get_solver(name), grid, x, noise=Gaussian(torch.Generator().manual_seed(0)))
    assert stateful.started == [first.denoiser, second.denoiser] and first.denoiser is not second.denoiser
    assert first.denoiser.calls == first.nfe == second.denoiser.calls
    plain = sample(den, get_solver(name), grid, x, noise=Gaussian(torch.Generator().manual_seed(0)))
    assert plain.denoiser is den and torch.equal(plain.x, first.x) and torch.equal(first.x, second.x)
