"""condiff.inversion.sdedit: SDEdit (Meng et al., ICLR 2022, sec. 3): noise the image to grid[k] with fresh
noise, then sample the remaining steps; ``strength`` is the share of the N steps that are run."""

import math

import pytest
import torch

from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, initial_noise, sample
from condiff.errors import ConfigError
from condiff.guidance.cfg import CFG
from condiff.inversion import sdedit
from condiff.inversion.sdedit import start_index
from condiff.solvers import DDIM, DDPM
from condiff.solvers.base import point


@pytest.mark.parametrize(
    "steps, strength, start",
    [
        (50, 1.0, 0),
        (50, 0.6, 20),
        (50, 0.5, 25),
        (50, 0.01, 49),
        (50, 1e-9, 49),
        (10, 0.25, 7),
        (10, 0.35, 6),
        (10, 0.05, 9),
        (1, 0.3, 0),
        (1, 1, 0),
        (7, 0.5, 3),
    ],
)
def test_start_index_runs_the_rounded_share_of_the_steps(steps, strength, start):
    """start_index(N, s) = N - max(1, round-half-up(s N)): strength 1 runs every step, any positive strength
    runs at least one, 0.6 of 50 runs 30 (start at grid[20]); 0.25 of 10 rounds 2.5 up to 3."""
    assert start_index(steps, strength) == start
    assert steps - start == max(1, math.floor(strength * steps + 0.5))


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_strength_is_refused(strength):
    """Strength must be a number in (0, 1]: a ConfigError that names the range."""
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        start_index(10, strength)


@pytest.mark.parametrize("solver", [DDIM(), DDPM()], ids=["ddim", "ddpm"])
def test_strength_1_on_a_zero_image_is_plain_sampling_with_the_same_draws(toy, solver):
    """With x0 = 0 and strength 1 the perturbed start alpha_T 0 + sigma_T eps is pure prior noise, so SDEdit
    is plain sampling from initial_noise with the same generator (and, for DDPM, the same later draws):
    the outputs are equal bit for bit, with N network evaluations."""
    m = toy(torch.float64)
    cond = m.cond(4)
    grid = make_grid(m.schedule, 10)
    den = CFG(m.denoiser, 3.0)
    zero = torch.zeros(4, 16, dtype=torch.float64)
    out = sdedit(den, solver, grid, zero, cond, 1.0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x_T = initial_noise(m.schedule, float(grid[0]), (4, 16), g, torch.float64)
    ref = sample(den, solver, grid, x_T, cond, Gaussian(g))
    assert torch.equal(out.x, ref.x) and out.nfe == ref.nfe == 10


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_sdedit_is_forward_noising_then_sampling_the_remaining_steps(toy, strength):
    """SDEdit at any strength: x_k = alpha_k x0 + sigma_k eps (eps the generator's first draw, k =
    start_index), then the solver from grid[k] to the end with the same generator: equal bit for bit, and
    N - k network evaluations."""
    m = toy(torch.float64)
    x0, cond = m.x0(4), m.cond(4)
    grid = make_grid(m.schedule, 20)
    out = sdedit(CFG(m.denoiser, 3.0), DDPM(), grid, x0, cond, strength, torch.Generator().manual_seed(3))
    k = start_index(20, strength)
    g = torch.Generator().manual_seed(3)
    p = point(m.schedule, grid[k])
    x_k = p.alpha * x0 + p.sigma * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ref = sample(CFG(m.denoiser, 3.0), DDPM(), grid[k:], x_k, cond, Gaussian(g))
    assert torch.equal(out.x, ref.x)
    assert out.nfe == 20 - k


def test_sdedit_refuses_a_bad_grid_and_strength(toy):
    """The grid must be strictly descending and the strength in (0, 1], checked before anything is drawn."""
    m = toy()
    with pytest.raises(ConfigError, match="descending"):
        sdedit(m.denoiser, DDIM(), torch.tensor([0.0, 5.0]), m.x0(1), {"c": m.cond(1)["c"]})
    with pytest.raises(ConfigError, match="strength"):
        sdedit(m.denoiser, DDIM(), make_grid(m.schedule, 5), m.x0(1), {"c": m.cond(1)["c"]}, strength=0)
